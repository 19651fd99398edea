// The all-to-all dispatch of expert parallelism: each rank sends the hidden row of every (token,
// slot) assignment of its own tokens to the rank that owns the expert, and gets the expert's
// output back. This file holds the plan of those exchanges, the exchanges themselves and the
// router losses over the group computed from each rank's own tokens; moe_ffn.cpp composes them.
//
// The plan reproduces the all-gather path exactly. The group's tokens are ordered rank by rank
// (rank r holds group tokens [r * num_tokens, (r + 1) * num_tokens)), and that path keeps, with
// capacity c, the first c assignments of each expert in (group token, slot) order. Here every rank
// all-gathers its per-expert assignment counts, so it knows how many assignments of each expert
// the lower ranks made and keeps only its own that fall within the capacity: dropped rows are never
// sent. A rank sends its kept rows in (expert, token, slot) order, so rank j receives from each
// source rank, in rank order, the rows of its local experts in (expert, token, slot) order; sorting
// them by local expert (stable) gives (expert, source rank, token, slot), which is the all-gather
// path's row order. Everything is fixed by the routing, never by the timing of the exchanges.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "ops/row_map.h"

namespace moeforge {

struct A2aDispatchPlan {
  int64_t num_tokens = 0;           // this rank's tokens
  int64_t group_tokens = 0;         // num_tokens * ranks
  std::vector<int64_t> group_load;  // [num_experts] assignments to each expert over the group
  int64_t num_dropped = 0;          // assignments to this rank's experts dropped by capacity
  // This rank's assignments (num_tokens x top_k, experts [0, num_experts)); its rows are the send
  // buffer in (expert, token, slot) order; dropped assignments have no row.
  ops::RowMap send_map;
  // The received rows as tokens of top_k 1, sorted by local expert: row_token indexes the receive
  // buffer; expert_offsets drive the grouped GEMMs.
  ops::RowMap recv_map;
  std::vector<size_t> send_rows, send_row_offsets;  // [num_ranks] rows to each rank
  std::vector<size_t> recv_rows, recv_row_offsets;  // [num_ranks] rows from each rank
};

// Collective over ep (one all_gather of num_experts counts per rank). expert_idx [num_tokens,
// top_k] is this rank's routing; capacity as ops::expert_capacity over the group's tokens (< 0:
// dropless). Experts are split evenly over ep's ranks in rank order.
A2aDispatchPlan plan_a2a_dispatch(const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                                  int64_t num_experts, int64_t capacity, Communicator& ep);

// plan_a2a_dispatch after its all-gather, with no communication: loads [num_ranks, num_experts]
// are every rank's assignments per expert, gathered by the caller (the GPU engine gathers them on
// the device); row `rank` must be the counts of expert_idx (checked).
A2aDispatchPlan plan_a2a_dispatch_from_loads(const int32_t* expert_idx, int64_t num_tokens,
                                             int64_t top_k, int64_t num_experts, int64_t capacity,
                                             const int64_t* loads, int64_t rank, int64_t num_ranks);

// to_owners: send [send_map rows, hidden] -> recv [recv_map rows, hidden] in receive order
// (source rank, then as sent). to_senders: the reverse, from receive order back to send order.
// Rows of elements of dtype, in the buffers ep takes (host, or device for a device communicator).
void a2a_exchange_to_owners(const void* send, void* recv, const A2aDispatchPlan& plan,
                            int64_t hidden, CommDType dtype, Communicator& ep);
void a2a_exchange_to_senders(const void* recv, void* send, const A2aDispatchPlan& plan,
                             int64_t hidden, CommDType dtype, Communicator& ep);
template <typename T>
void a2a_exchange_to_owners(const T* send, T* recv, const A2aDispatchPlan& plan, int64_t hidden,
                            Communicator& ep) {
  a2a_exchange_to_owners(static_cast<const void*>(send), static_cast<void*>(recv), plan, hidden,
                         comm_dtype_of<T>(), ep);
}
template <typename T>
void a2a_exchange_to_senders(const T* recv, T* send, const A2aDispatchPlan& plan, int64_t hidden,
                             Communicator& ep) {
  a2a_exchange_to_senders(static_cast<const void*>(recv), static_cast<void*>(send), plan, hidden,
                          comm_dtype_of<T>(), ep);
}

// The aux and z losses over the group (ops/router.h's definitions over group_tokens, the aux loss
// over balance_groups), from this rank's probs and logits [num_tokens, num_experts] and the plan's
// group_load. Collective over ep (one all_reduce of num_experts + 1 doubles).
struct GroupRouterLosses {
  double aux_loss = 0.0;
  double z_loss = 0.0;
};
template <typename T>
GroupRouterLosses a2a_group_router_losses(const T* probs, const T* logits,
                                          const A2aDispatchPlan& plan, int64_t num_experts,
                                          int64_t top_k, int64_t balance_groups, Communicator& ep);

// dlogits [num_tokens, num_experts] += the gradient of d_aux * aux_loss over the group with
// respect to this rank's logits: d aux / d probs[t, e] = G * f_{g(e)} / group_tokens with the
// group's assignment fractions of the balance groups (ops::balance_fractions, a constant), through
// the softmax Jacobian.
template <typename T>
void a2a_add_group_aux_gradient(T* dlogits, const T* probs, const A2aDispatchPlan& plan,
                                int64_t num_experts, int64_t top_k, int64_t balance_groups,
                                double d_aux);

}  // namespace moeforge
