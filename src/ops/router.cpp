// MoE router on the CPU: softmax, top-k with ties toward the lower expert index, optional
// renormalisation, the aux and z losses and the backward through all of them.
#include "ops/router.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace moeforge::ops {

namespace {

void check_dims(const RouterDims& dims) {
  MF_CHECK(dims.num_tokens >= 0, "router: num_tokens ({}) must be >= 0", dims.num_tokens);
  MF_CHECK(dims.num_experts >= 1, "router: num_experts ({}) must be >= 1", dims.num_experts);
  MF_CHECK(dims.top_k >= 1 && dims.top_k <= dims.num_experts,
           "router: top_k ({}) must be in [1, num_experts = {}]", dims.top_k, dims.num_experts);
}

// logsumexp of one row of logits, in double.
template <typename T>
double row_logsumexp(const T* row, int64_t num_experts) {
  double max_logit = static_cast<double>(row[0]);
  for (int64_t e = 1; e < num_experts; ++e) max_logit = std::max(max_logit, double(row[e]));
  double sum = 0.0;
  for (int64_t e = 0; e < num_experts; ++e) sum += std::exp(double(row[e]) - max_logit);
  return max_logit + std::log(sum);
}

// balance_fractions of the assignments in expert_idx: the aux-loss gradient factor of
// probs[., e] per unit d_aux (times G / num_tokens), and (times P_e) the summands of the aux loss.
std::vector<double> assignment_fractions(const int32_t* expert_idx, const RouterDims& dims) {
  std::vector<double> load(static_cast<size_t>(dims.num_experts), 0.0);
  const int64_t num_assignments = dims.num_tokens * dims.top_k;
  for (int64_t a = 0; a < num_assignments; ++a) {
    const int32_t e = expert_idx[a];
    MF_CHECK(e >= 0 && e < dims.num_experts,
             "router: expert_idx of token {} slot {} is {}, outside [0, {})", a / dims.top_k,
             a % dims.top_k, e, dims.num_experts);
    load[static_cast<size_t>(e)] += 1.0;
  }
  return balance_fractions(load, static_cast<double>(num_assignments), dims.balance_groups);
}

}  // namespace

template <typename T>
void router_forward(T* probs, int32_t* expert_idx, T* gates, const T* logits,
                    const RouterDims& dims) {
  check_dims(dims);
  const int64_t num_experts = dims.num_experts;
  const int64_t top_k = dims.top_k;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
    const T* row = logits + t * num_experts;
    T* p = probs + t * num_experts;
    double max_logit = static_cast<double>(row[0]);
    for (int64_t e = 1; e < num_experts; ++e) max_logit = std::max(max_logit, double(row[e]));
    double sum = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) sum += std::exp(double(row[e]) - max_logit);
    for (int64_t e = 0; e < num_experts; ++e) {
      p[e] = static_cast<T>(std::exp(double(row[e]) - max_logit) / sum);
    }

    // Selection by repeated arg-max with a strict comparison in ascending expert order: among
    // equal probabilities the lower index wins, and the slots come out in descending order.
    int32_t* idx = expert_idx + t * top_k;
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < num_experts; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || idx[i] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      idx[j] = static_cast<int32_t>(best);
    }

    T* g = gates + t * top_k;
    double selected_sum = 0.0;
    for (int64_t j = 0; j < top_k; ++j) selected_sum += static_cast<double>(p[idx[j]]);
    for (int64_t j = 0; j < top_k; ++j) {
      g[j] = dims.norm_topk_prob ? static_cast<T>(static_cast<double>(p[idx[j]]) / selected_sum)
                                 : p[idx[j]];
    }
  }
  // A non-finite logit makes its row's probabilities NaN. The selection above stays defined (NaN
  // never compares greater, so the lowest free indices are taken) and the NaN flows on to the
  // loss, where the trainer's guard reports it on every rank at once; throwing here would stop one
  // rank while the others wait in a collective.
}

std::vector<double> balance_fractions(const std::vector<double>& load, double num_assignments,
                                      int64_t balance_groups) {
  const auto num_experts = static_cast<int64_t>(load.size());
  const int64_t groups = num_balance_groups(num_experts, balance_groups);
  MF_CHECK(groups >= 1 && groups <= num_experts && num_experts % groups == 0,
           "router: {} balance groups do not split {} experts", groups, num_experts);
  const int64_t size = num_experts / groups;
  std::vector<double> fraction(load.size());
  for (int64_t g = 0; g < groups; ++g) {
    double group_load = 0.0;
    for (int64_t e = g * size; e < (g + 1) * size; ++e) group_load += load[static_cast<size_t>(e)];
    for (int64_t e = g * size; e < (g + 1) * size; ++e) {
      fraction[static_cast<size_t>(e)] = group_load / num_assignments;
    }
  }
  return fraction;
}

template <typename T>
double router_aux_loss(const T* probs, const int32_t* expert_idx, const RouterDims& dims) {
  check_dims(dims);
  if (dims.num_tokens == 0) return 0.0;
  const std::vector<double> fraction = assignment_fractions(expert_idx, dims);
  double loss = 0.0;
  for (int64_t e = 0; e < dims.num_experts; ++e) {
    double mean_prob = 0.0;
    for (int64_t t = 0; t < dims.num_tokens; ++t) {
      mean_prob += static_cast<double>(probs[t * dims.num_experts + e]);
    }
    mean_prob /= static_cast<double>(dims.num_tokens);
    loss += fraction[static_cast<size_t>(e)] * mean_prob;
  }
  return static_cast<double>(num_balance_groups(dims.num_experts, dims.balance_groups)) * loss;
}

template <typename T>
double router_z_loss(const T* logits, const RouterDims& dims) {
  check_dims(dims);
  if (dims.num_tokens == 0) return 0.0;
  double loss = 0.0;
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
    const double lse = row_logsumexp(logits + t * dims.num_experts, dims.num_experts);
    loss += lse * lse;
  }
  return loss / static_cast<double>(dims.num_tokens);
}

template <typename T>
void router_backward(T* dlogits, const T* dgates, const T* logits, const T* probs,
                     const int32_t* expert_idx, double d_aux, double d_z, const RouterDims& dims) {
  check_dims(dims);
  if (dims.num_tokens == 0) return;
  const int64_t num_experts = dims.num_experts;
  const int64_t top_k = dims.top_k;
  const double inv_tokens = 1.0 / static_cast<double>(dims.num_tokens);
  // d aux / d probs[n, e] = G * f_{g(e)} / n (f is constant), the same for every token.
  std::vector<double> aux_grad = assignment_fractions(expert_idx, dims);
  const auto groups = static_cast<double>(num_balance_groups(num_experts, dims.balance_groups));
  for (auto& g : aux_grad) g *= d_aux * groups * inv_tokens;

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
    const T* p = probs + t * num_experts;
    const int32_t* idx = expert_idx + t * top_k;
    const T* dg = dgates + t * top_k;
    std::vector<double> dprobs(aux_grad);  // [num_experts]
    if (dims.norm_topk_prob) {
      // g_j = p_j / S: d p_i = (dg_i - sum_j dg_j g_j) / S.
      double selected_sum = 0.0;
      for (int64_t j = 0; j < top_k; ++j) selected_sum += static_cast<double>(p[idx[j]]);
      double weighted = 0.0;
      for (int64_t j = 0; j < top_k; ++j) {
        weighted += static_cast<double>(dg[j]) * static_cast<double>(p[idx[j]]) / selected_sum;
      }
      for (int64_t j = 0; j < top_k; ++j) {
        dprobs[idx[j]] += (static_cast<double>(dg[j]) - weighted) / selected_sum;
      }
    } else {
      for (int64_t j = 0; j < top_k; ++j) dprobs[idx[j]] += static_cast<double>(dg[j]);
    }

    // Softmax Jacobian: dlogit_e = p_e (dp_e - sum_i dp_i p_i); the z-loss term adds
    // d_z * 2 * lse * p_e / n directly on the logits.
    double dot = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) dot += dprobs[e] * static_cast<double>(p[e]);
    const double z_scale =
        d_z == 0.0 ? 0.0
                   : d_z * 2.0 * row_logsumexp(logits + t * num_experts, num_experts) * inv_tokens;
    T* dl = dlogits + t * num_experts;
    for (int64_t e = 0; e < num_experts; ++e) {
      const double pe = static_cast<double>(p[e]);
      dl[e] = static_cast<T>(pe * (dprobs[e] - dot) + z_scale * pe);
    }
  }
}

#define MOEFORGE_INSTANTIATE_ROUTER(T)                                                       \
  template void router_forward<T>(T*, int32_t*, T*, const T*, const RouterDims&);            \
  template double router_aux_loss<T>(const T*, const int32_t*, const RouterDims&);           \
  template double router_z_loss<T>(const T*, const RouterDims&);                             \
  template void router_backward<T>(T*, const T*, const T*, const T*, const int32_t*, double, \
                                   double, const RouterDims&);
MOEFORGE_INSTANTIATE_ROUTER(float)
MOEFORGE_INSTANTIATE_ROUTER(double)
#undef MOEFORGE_INSTANTIATE_ROUTER

}  // namespace moeforge::ops
