// The all-to-all dispatch's row maps on the device and the permutations between its row orders.
#include "cuda/moe_dispatch_a2a.h"

#include <algorithm>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/moe_dispatch.h"

namespace moeforge::cuda {

namespace {

// Appends values (converted to int32) at packed + *next, advances *next and returns where they
// start.
template <typename T>
int64_t append(int32_t* packed, int64_t* next, const std::vector<T>& values) {
  const int64_t start = *next;
  std::transform(values.begin(), values.end(), packed + start,
                 [](T v) { return static_cast<int32_t>(v); });
  *next += static_cast<int64_t>(values.size());
  return start;
}

}  // namespace

int64_t a2a_map_ints(int64_t num_assignments, int64_t max_received, int64_t num_local_experts,
                     int64_t num_experts) {
  return 2 * num_assignments + 2 * max_received + num_local_experts + 1 + num_experts;
}

A2aMapOffsets pack_a2a_maps(int32_t* packed, int64_t capacity, const A2aDispatchPlan& plan) {
  const ops::RowMap& send = plan.send_map;
  const ops::RowMap& recv = plan.recv_map;
  const int64_t needed = send.num_rows() + static_cast<int64_t>(send.assignment_row.size()) +
                         recv.num_rows() + static_cast<int64_t>(recv.assignment_row.size()) +
                         static_cast<int64_t>(recv.expert_offsets.size() + plan.group_load.size());
  MF_CHECK(needed <= capacity,
           "all-to-all dispatch: the plan's maps take {} ints ({} rows sent, {} received), the "
           "buffer holds {}",
           needed, send.num_rows(), recv.num_rows(), capacity);
  // The plan's int64 values are row counts and offsets below the int32 row index range, which
  // plan_a2a_dispatch checks.
  A2aMapOffsets at;
  int64_t next = 0;
  at.send_row_token = append(packed, &next, send.row_token);
  at.send_assignment_row = append(packed, &next, send.assignment_row);
  at.recv_row_token = append(packed, &next, recv.row_token);
  at.recv_assignment_row = append(packed, &next, recv.assignment_row);
  at.expert_offsets = append(packed, &next, recv.expert_offsets);
  at.group_load = append(packed, &next, plan.group_load);
  at.total = next;
  return at;
}

A2aDeviceMaps upload_a2a_maps(int32_t* device, int32_t* staging, int64_t capacity,
                              const A2aDispatchPlan& plan, cudaStream_t stream) {
  const A2aMapOffsets at = pack_a2a_maps(staging, capacity, plan);
  MF_CUDA_CHECK(cudaMemcpyAsync(device, staging, static_cast<size_t>(at.total) * sizeof(int32_t),
                                cudaMemcpyHostToDevice, stream));
  return {device + at.send_row_token, device + at.send_assignment_row,
          device + at.recv_row_token, device + at.recv_assignment_row,
          device + at.expert_offsets, device + at.group_load};
}

void a2a_send_order(bf16* send, const bf16* x, const A2aDeviceMaps& maps,
                    const A2aDispatchPlan& plan, int64_t hidden, cudaStream_t stream) {
  scatter_rows(send, x, maps.send_row_token, plan.send_map.num_rows(), hidden, stream);
}

void a2a_expert_order(bf16* expert_rows, const bf16* recv, const A2aDeviceMaps& maps,
                      const A2aDispatchPlan& plan, int64_t hidden, cudaStream_t stream) {
  scatter_rows(expert_rows, recv, maps.recv_row_token, plan.recv_map.num_rows(), hidden, stream);
}

void a2a_receive_order(bf16* recv, const bf16* expert_rows, const A2aDeviceMaps& maps,
                       const A2aDispatchPlan& plan, int64_t hidden, cudaStream_t stream) {
  // The received rows are tokens of top_k 1: assignment_row maps each to its expert-order row.
  scatter_rows(recv, expert_rows, maps.recv_assignment_row, plan.recv_map.num_rows(), hidden,
               stream);
}

}  // namespace moeforge::cuda
