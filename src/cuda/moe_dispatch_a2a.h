// The all-to-all dispatch of expert parallelism on the GPU. The host plans it with the CPU spec
// (model/moe_dispatch_a2a.h, plan_a2a_dispatch_from_loads: from this rank's routing and the
// group's per-expert counts); this file packs the plan's row maps, copies them to the device, and
// permutes bf16 rows between the three orders of the dispatch with cuda/moe_dispatch.h's row
// kernels: send order (this rank's kept assignments by expert, token, slot: what it sends), receive
// order (source rank, then as sent: what the exchange delivers) and expert order (by local expert,
// source rank, token, slot: the all-gather path's rows, which the grouped GEMMs read). The
// exchanges themselves are model/moe_dispatch_a2a.h's a2a_exchange_to_owners / _to_senders over a
// device communicator (NCCL's all_to_all_v).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/bf16.h"
#include "model/moe_dispatch_a2a.h"

namespace moeforge::cuda {

// Where each map of a plan starts in the packed int32 maps (pack_a2a_maps), in ints.
struct A2aMapOffsets {
  int64_t send_row_token = 0;       // [send rows] the token of each row sent
  int64_t send_assignment_row = 0;  // [num_tokens * top_k] the send row of each assignment, or -1
  int64_t recv_row_token = 0;       // [received rows] the received row of each expert-order row
  int64_t recv_assignment_row = 0;  // [received rows] the expert-order row of each received row
  int64_t expert_offsets = 0;       // [local experts + 1] the local experts' expert-order rows
  int64_t group_load = 0;           // [num_experts] the group's assignments to each expert
  int64_t total = 0;                // ints of all of them
};

// The same maps on the device.
struct A2aDeviceMaps {
  const int32_t* send_row_token = nullptr;
  const int32_t* send_assignment_row = nullptr;
  const int32_t* recv_row_token = nullptr;
  const int32_t* recv_assignment_row = nullptr;
  const int32_t* expert_offsets = nullptr;
  const int32_t* group_load = nullptr;
};

// The most ints pack_a2a_maps writes for a plan of num_assignments (num_tokens * top_k)
// assignments that receives at most max_received rows.
int64_t a2a_map_ints(int64_t num_assignments, int64_t max_received, int64_t num_local_experts,
                     int64_t num_experts);

// Packs the plan's maps, one after another in A2aMapOffsets' order, into packed (capacity ints;
// throws when they do not fit) and returns where each starts.
A2aMapOffsets pack_a2a_maps(int32_t* packed, int64_t capacity, const A2aDispatchPlan& plan);

// pack_a2a_maps into staging (pinned host memory), then one copy of the packed maps to device on
// stream; both hold capacity ints. The host must not write staging again before the stream has
// passed the copy. Returns the maps on the device.
A2aDeviceMaps upload_a2a_maps(int32_t* device, int32_t* staging, int64_t capacity,
                              const A2aDispatchPlan& plan, cudaStream_t stream);

// send [send rows, hidden] = x [num_tokens, hidden]'s rows in send order.
void a2a_send_order(bf16* send, const bf16* x, const A2aDeviceMaps& maps,
                    const A2aDispatchPlan& plan, int64_t hidden, cudaStream_t stream);
// expert_rows [received rows, hidden] = recv's rows (receive order) in expert order.
void a2a_expert_order(bf16* expert_rows, const bf16* recv, const A2aDeviceMaps& maps,
                      const A2aDispatchPlan& plan, int64_t hidden, cudaStream_t stream);
// recv [received rows, hidden] = expert_rows' rows (expert order) in receive order.
void a2a_receive_order(bf16* recv, const bf16* expert_rows, const A2aDeviceMaps& maps,
                       const A2aDispatchPlan& plan, int64_t hidden, cudaStream_t stream);

}  // namespace moeforge::cuda
