// The row map of an MoE layer: where each (token, slot) assignment goes in the expert-sorted
// buffer that the grouped GEMM reads. Rows are ordered by expert, then by token index, then slot.
// Built for a range of experts [expert_begin, expert_end) so that with expert parallelism each
// rank maps only the rows of its local experts.
//
// Capacity (token dropping): when capacity >= 0 each expert keeps at most `capacity` rows, the
// earliest tokens first; later assignments are dropped (assignment_row = -1), their gate does not
// contribute and the token's residual passes through. capacity < 0 means dropless.
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge::ops {

struct RowMap {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  int64_t expert_begin = 0;
  int64_t expert_end = 0;
  std::vector<int64_t> expert_offsets;     // [num_local_experts + 1], row ranges per local expert
  std::vector<int32_t> row_token;          // [num_rows] token index of each row
  std::vector<int32_t> assignment_row;     // [num_tokens * top_k] row of assignment, -1 if not here
  std::vector<int64_t> tokens_per_expert;  // [num_local_experts] routed before dropping
  int64_t num_dropped = 0;                 // assignments to local experts dropped by capacity

  int64_t num_rows() const { return static_cast<int64_t>(row_token.size()); }
  int64_t num_local_experts() const { return expert_end - expert_begin; }
};

// capacity_for(capacity_factor, n, k, E) = ceil(capacity_factor * n * k / E), or -1 if the factor
// is <= 0 (dropless).
int64_t expert_capacity(double capacity_factor, int64_t num_tokens, int64_t top_k,
                        int64_t num_experts);

RowMap build_row_map(const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                     int64_t expert_begin, int64_t expert_end, int64_t capacity);

}  // namespace moeforge::ops
