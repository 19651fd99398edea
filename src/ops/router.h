// MoE router: softmax over expert logits, top-k selection, optional renormalisation of the
// selected probabilities, and the load-balancing losses.
//
// Top-k ties are broken toward the lower expert index, so routing is exact and reproducible.
// Auxiliary loss (Switch-style, normalised so perfect balance gives 1):
//   f_e = (number of (token, slot) assignments to e) / (n * top_k),  P_e = mean_n probs[n, e]
//   aux = num_experts * sum_e f_e * P_e      (f is a constant for the gradient)
// or, over G balance groups (MegaScale-MoE's per-GPU balance: experts [g E / G, (g + 1) E / G)
// form group g, G the expert-parallel size, so only the load of each GPU is balanced):
//   aux = G * sum_g f_g * P_g,  f_g = sum_{e in g} f_e,  P_g = sum_{e in g} P_e
// (G = num_experts is the per-expert loss; G = 1 makes it the constant 1).
// Router z-loss (ST-MoE): z = mean_n (logsumexp_e logits[n, e])^2
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge::ops {

struct RouterDims {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t top_k;
  bool norm_topk_prob;         // renormalise the k selected probabilities to sum to 1
  int64_t balance_groups = 0;  // G of the aux loss (a divisor of num_experts); 0: num_experts
};

// The aux loss's G: balance_groups, or num_experts when it is 0.
inline int64_t num_balance_groups(int64_t num_experts, int64_t balance_groups) {
  return balance_groups > 0 ? balance_groups : num_experts;
}

// f_{g(e)} for every expert e: the fraction of the num_assignments (token, slot) assignments that
// went to e's balance group, from load [num_experts] (assignments per expert). The aux loss is
// num_balance_groups * sum_e f_{g(e)} P_e, and its gradient with respect to probs[t, e] is
// num_balance_groups * f_{g(e)} / num_tokens.
std::vector<double> balance_fractions(const std::vector<double>& load, double num_assignments,
                                      int64_t balance_groups);

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
