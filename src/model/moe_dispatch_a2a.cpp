// The plan and the exchanges of the all-to-all expert dispatch, and the group's router losses from
// each rank's own tokens (see moe_dispatch_a2a.h for the row order and the capacity rule).
#include "model/moe_dispatch_a2a.h"

#include <algorithm>
#include <cstdint>

#include "core/error.h"
#include "ops/router.h"

namespace moeforge {

namespace {

// This rank's assignments in send order: rows sorted by expert, then token, then slot; expert e
// keeps the first kept[e] of its assignments (in token, slot order) and drops the rest.
ops::RowMap build_send_map(const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                           const std::vector<int64_t>& local_load, const int64_t* kept,
                           int64_t num_experts) {
  ops::RowMap map;
  map.num_tokens = num_tokens;
  map.top_k = top_k;
  map.expert_begin = 0;
  map.expert_end = num_experts;
  map.tokens_per_expert = local_load;
  map.expert_offsets.assign(static_cast<size_t>(num_experts + 1), 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    map.expert_offsets[e + 1] = map.expert_offsets[e] + kept[e];
  }
  const int64_t num_assignments = num_tokens * top_k;
  map.row_token.assign(static_cast<size_t>(map.expert_offsets[num_experts]), 0);
  map.assignment_row.assign(static_cast<size_t>(num_assignments), -1);
  std::vector<int64_t> next_row(map.expert_offsets.begin(), map.expert_offsets.end() - 1);
  for (int64_t a = 0; a < num_assignments; ++a) {
    const int64_t e = expert_idx[a];
    if (next_row[e] == map.expert_offsets[e + 1]) {
      ++map.num_dropped;
      continue;
    }
    const int64_t row = next_row[e]++;
    map.row_token[row] = static_cast<int32_t>(a / top_k);
    map.assignment_row[a] = static_cast<int32_t>(row);
  }
  return map;
}

std::vector<size_t> exclusive_prefix_sum(const std::vector<size_t>& counts) {
  std::vector<size_t> offsets(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) offsets[i] = offsets[i - 1] + counts[i - 1];
  return offsets;
}

// all_to_all_v of rows of `hidden` elements of dtype.
void exchange_rows(const void* send, const std::vector<size_t>& send_rows,
                   const std::vector<size_t>& send_row_offsets, void* recv,
                   const std::vector<size_t>& recv_rows,
                   const std::vector<size_t>& recv_row_offsets, int64_t hidden, CommDType dtype,
                   Communicator& ep) {
  const size_t num_ranks = static_cast<size_t>(ep.size());
  MF_CHECK(send_rows.size() == num_ranks && recv_rows.size() == num_ranks,
           "all-to-all dispatch: the plan is for {} ranks, the group has {}", send_rows.size(),
           num_ranks);
  const size_t row = static_cast<size_t>(hidden);
  std::vector<size_t> send_counts(num_ranks), send_offsets(num_ranks);
  std::vector<size_t> recv_counts(num_ranks), recv_offsets(num_ranks);
  for (size_t j = 0; j < num_ranks; ++j) {
    send_counts[j] = send_rows[j] * row;
    send_offsets[j] = send_row_offsets[j] * row;
    recv_counts[j] = recv_rows[j] * row;
    recv_offsets[j] = recv_row_offsets[j] * row;
  }
  ep.all_to_all_v(send, send_counts.data(), send_offsets.data(), recv, recv_counts.data(),
                  recv_offsets.data(), dtype);
}

// This rank's assignments per expert, checking every index.
std::vector<int64_t> count_assignments(const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                                       int64_t num_experts) {
  std::vector<int64_t> load(static_cast<size_t>(num_experts), 0);  // [num_experts]
  for (int64_t a = 0; a < num_tokens * top_k; ++a) {
    const int32_t e = expert_idx[a];
    MF_CHECK(e >= 0 && e < num_experts,
             "all-to-all dispatch: expert index of token {} slot {} is {}, outside [0, {})",
             a / top_k, a % top_k, e, num_experts);
    ++load[static_cast<size_t>(e)];
  }
  return load;
}

void check_plan_dims(int64_t num_tokens, int64_t top_k, int64_t num_experts, int64_t num_ranks) {
  MF_CHECK(num_tokens >= 0 && top_k >= 1 && top_k <= num_experts,
           "all-to-all dispatch: invalid num_tokens {} or top_k {} (num_experts {})", num_tokens,
           top_k, num_experts);
  MF_CHECK(num_ranks >= 1 && num_experts % num_ranks == 0,
           "all-to-all dispatch: num_experts ({}) must be divisible by the expert-parallel size "
           "({})",
           num_experts, num_ranks);
  MF_CHECK(num_tokens * num_ranks * top_k <= INT32_MAX,
           "all-to-all dispatch: {} group tokens x top_k {} exceed the int32 row index range",
           num_tokens * num_ranks, top_k);
}

}  // namespace

A2aDispatchPlan plan_a2a_dispatch(const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                                  int64_t num_experts, int64_t capacity, Communicator& ep) {
  check_plan_dims(num_tokens, top_k, num_experts, ep.size());
  const std::vector<int64_t> local_load =
      count_assignments(expert_idx, num_tokens, top_k, num_experts);
  std::vector<int64_t> loads(static_cast<size_t>(ep.size() * num_experts));  // [ranks, experts]
  ep.all_gather(local_load.data(), loads.data(), static_cast<size_t>(num_experts));
  return plan_a2a_dispatch_from_loads(expert_idx, num_tokens, top_k, num_experts, capacity,
                                      loads.data(), ep.rank(), ep.size());
}

A2aDispatchPlan plan_a2a_dispatch_from_loads(const int32_t* expert_idx, int64_t num_tokens,
                                             int64_t top_k, int64_t num_experts, int64_t capacity,
                                             const int64_t* loads, int64_t rank,
                                             int64_t num_ranks) {
  check_plan_dims(num_tokens, top_k, num_experts, num_ranks);
  MF_CHECK(rank >= 0 && rank < num_ranks, "all-to-all dispatch: rank {} of a group of {}", rank,
           num_ranks);
  const int64_t num_local_experts = num_experts / num_ranks;
  const int64_t expert_begin = rank * num_local_experts;
  const std::vector<int64_t> local_load =
      count_assignments(expert_idx, num_tokens, top_k, num_experts);
  for (int64_t e = 0; e < num_experts; ++e) {
    MF_CHECK(loads[rank * num_experts + e] == local_load[static_cast<size_t>(e)],
             "all-to-all dispatch: the gathered loads give rank {} {} assignments to expert {}, "
             "its routing has {}",
             rank, loads[rank * num_experts + e], e, local_load[static_cast<size_t>(e)]);
  }

  A2aDispatchPlan plan;
  plan.num_tokens = num_tokens;
  plan.group_tokens = num_tokens * num_ranks;
  // kept[s, e]: the assignments of rank s to expert e within the capacity, which the lower ranks'
  // assignments to e fill first.
  std::vector<int64_t> kept(static_cast<size_t>(num_ranks * num_experts));  // [ranks, experts]
  plan.group_load.assign(static_cast<size_t>(num_experts), 0);
  for (int64_t s = 0; s < num_ranks; ++s) {
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t count = loads[s * num_experts + e];
      MF_CHECK(count >= 0, "all-to-all dispatch: rank {} has {} assignments to expert {}", s, count,
               e);
      const int64_t before = plan.group_load[e];
      kept[s * num_experts + e] =
          capacity < 0 ? count : std::clamp<int64_t>(capacity - before, 0, count);
      plan.group_load[e] += count;
    }
  }
  for (int64_t e = expert_begin; e < expert_begin + num_local_experts; ++e) {
    if (capacity >= 0) plan.num_dropped += std::max<int64_t>(plan.group_load[e] - capacity, 0);
  }

  plan.send_map = build_send_map(expert_idx, num_tokens, top_k, local_load,
                                 kept.data() + rank * num_experts, num_experts);
  plan.send_rows.assign(static_cast<size_t>(num_ranks), 0);
  plan.recv_rows.assign(static_cast<size_t>(num_ranks), 0);
  std::vector<int32_t> recv_expert;  // [received rows] expert of each row, in receive order
  for (int64_t j = 0; j < num_ranks; ++j) {
    for (int64_t i = 0; i < num_local_experts; ++i) {
      const int64_t e = j * num_local_experts + i;
      plan.send_rows[j] += static_cast<size_t>(kept[rank * num_experts + e]);
      const int64_t from_j = kept[j * num_experts + expert_begin + i];
      plan.recv_rows[j] += static_cast<size_t>(from_j);
      recv_expert.insert(recv_expert.end(), static_cast<size_t>(from_j),
                         static_cast<int32_t>(expert_begin + i));
    }
  }
  plan.send_row_offsets = exclusive_prefix_sum(plan.send_rows);
  plan.recv_row_offsets = exclusive_prefix_sum(plan.recv_rows);
  plan.recv_map = ops::build_row_map(recv_expert.data(), static_cast<int64_t>(recv_expert.size()),
                                     1, expert_begin, expert_begin + num_local_experts, -1);
  return plan;
}

void a2a_exchange_to_owners(const void* send, void* recv, const A2aDispatchPlan& plan,
                            int64_t hidden, CommDType dtype, Communicator& ep) {
  exchange_rows(send, plan.send_rows, plan.send_row_offsets, recv, plan.recv_rows,
                plan.recv_row_offsets, hidden, dtype, ep);
}

void a2a_exchange_to_senders(const void* recv, void* send, const A2aDispatchPlan& plan,
                             int64_t hidden, CommDType dtype, Communicator& ep) {
  exchange_rows(recv, plan.recv_rows, plan.recv_row_offsets, send, plan.send_rows,
                plan.send_row_offsets, hidden, dtype, ep);
}

namespace {

// ops::balance_fractions of the group's assignments (the plan's group_load).
std::vector<double> group_balance_fractions(const A2aDispatchPlan& plan, int64_t num_experts,
                                            int64_t top_k, int64_t balance_groups) {
  std::vector<double> load(static_cast<size_t>(num_experts));
  for (int64_t e = 0; e < num_experts; ++e) load[e] = static_cast<double>(plan.group_load[e]);
  return ops::balance_fractions(
      load, static_cast<double>(plan.group_tokens) * static_cast<double>(top_k), balance_groups);
}

}  // namespace

template <typename T>
GroupRouterLosses a2a_group_router_losses(const T* probs, const T* logits,
                                          const A2aDispatchPlan& plan, int64_t num_experts,
                                          int64_t top_k, int64_t balance_groups, Communicator& ep) {
  const int64_t num_tokens = plan.num_tokens;
  // sums[e]: probs[., e] summed over this rank's tokens; sums[num_experts]: the squared
  // logsumexp summed likewise (router_z_loss is its mean).
  std::vector<double> sums(static_cast<size_t>(num_experts + 1), 0.0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t e = 0; e < num_experts; ++e) {
      sums[e] += static_cast<double>(probs[t * num_experts + e]);
    }
  }
  const ops::RouterDims local_dims{num_tokens, num_experts, top_k, true};
  sums[num_experts] = ops::router_z_loss<T>(logits, local_dims) * static_cast<double>(num_tokens);
  ep.all_reduce_sum(sums.data(), sums.size());
  if (plan.group_tokens == 0) return {};
  const double group_tokens = static_cast<double>(plan.group_tokens);
  const std::vector<double> fraction =
      group_balance_fractions(plan, num_experts, top_k, balance_groups);
  double aux = 0.0;
  for (int64_t e = 0; e < num_experts; ++e) aux += fraction[e] * (sums[e] / group_tokens);
  const auto groups = static_cast<double>(ops::num_balance_groups(num_experts, balance_groups));
  return {groups * aux, sums[num_experts] / group_tokens};
}

template <typename T>
void a2a_add_group_aux_gradient(T* dlogits, const T* probs, const A2aDispatchPlan& plan,
                                int64_t num_experts, int64_t top_k, int64_t balance_groups,
                                double d_aux) {
  if (d_aux == 0.0 || plan.num_tokens == 0) return;
  const double group_tokens = static_cast<double>(plan.group_tokens);
  const auto groups = static_cast<double>(ops::num_balance_groups(num_experts, balance_groups));
  // [num_experts] d aux / d probs
  std::vector<double> aux_grad = group_balance_fractions(plan, num_experts, top_k, balance_groups);
  for (double& g : aux_grad) g *= d_aux * groups / group_tokens;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < plan.num_tokens; ++t) {
    const T* p = probs + t * num_experts;
    double dot = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) dot += aux_grad[e] * static_cast<double>(p[e]);
    T* dl = dlogits + t * num_experts;
    for (int64_t e = 0; e < num_experts; ++e) {
      dl[e] += static_cast<T>(static_cast<double>(p[e]) * (aux_grad[e] - dot));
    }
  }
}

#define MOEFORGE_INSTANTIATE_A2A(T)                                                          \
  template GroupRouterLosses a2a_group_router_losses<T>(                                     \
      const T*, const T*, const A2aDispatchPlan&, int64_t, int64_t, int64_t, Communicator&); \
  template void a2a_add_group_aux_gradient<T>(T*, const T*, const A2aDispatchPlan&, int64_t, \
                                              int64_t, int64_t, double);
MOEFORGE_INSTANTIATE_A2A(float)
MOEFORGE_INSTANTIATE_A2A(double)
#undef MOEFORGE_INSTANTIATE_A2A

}  // namespace moeforge
