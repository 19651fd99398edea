// MoE router: softmax over expert logits, top-k selection, optional renormalisation of the
// selected probabilities, and the load-balancing losses.
//
// Top-k ties are broken toward the lower expert index, so routing is exact and reproducible.
// Auxiliary loss (Switch-style, normalised so perfect balance gives 1):
//   f_e = (number of (token, slot) assignments to e) / (n * top_k),  P_e = mean_n probs[n, e]
//   aux = num_experts * sum_e f_e * P_e      (f is a constant for the gradient)
// Router z-loss (ST-MoE): z = mean_n (logsumexp_e logits[n, e])^2
#pragma once

#include <cstdint>

namespace moeforge::ops {

struct RouterDims {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t top_k;
  bool norm_topk_prob;  // renormalise the k selected probabilities to sum to 1
};

// logits [n, E] -> probs [n, E] (softmax, saved), expert_idx [n, k] (descending probability),
// gates [n, k] (selected probabilities, renormalised if norm_topk_prob).
template <typename T>
void router_forward(T* probs, int32_t* expert_idx, T* gates, const T* logits,
                    const RouterDims& dims);

// Auxiliary and z losses of one router (definitions above).
template <typename T>
double router_aux_loss(const T* probs, const int32_t* expert_idx, const RouterDims& dims);
template <typename T>
double router_z_loss(const T* logits, const RouterDims& dims);

// dlogits [n, E] (assign) from: dgates [n, k] (gradient of the gates), d_aux (gradient of the
// final loss with respect to this router's aux loss) and d_z (likewise for the z-loss).
template <typename T>
void router_backward(T* dlogits, const T* dgates, const T* logits, const T* probs,
                     const int32_t* expert_idx, double d_aux, double d_z, const RouterDims& dims);

}  // namespace moeforge::ops
