// Builds the row map of an MoE layer: expert-sorted rows for a range of experts, with optional
// capacity dropping that keeps the earliest tokens.
#include "ops/row_map.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.h"

namespace moeforge::ops {

int64_t expert_capacity(double capacity_factor, int64_t num_tokens, int64_t top_k,
                        int64_t num_experts) {
  MF_CHECK(num_experts >= 1, "expert_capacity: num_experts ({}) must be >= 1", num_experts);
  MF_CHECK(num_tokens >= 0 && top_k >= 1,
           "expert_capacity: num_tokens ({}) must be >= 0 and top_k ({}) >= 1", num_tokens, top_k);
  if (capacity_factor <= 0.0) return -1;
  return static_cast<int64_t>(
      std::ceil(capacity_factor * static_cast<double>(num_tokens) * static_cast<double>(top_k) /
                static_cast<double>(num_experts)));
}

RowMap build_row_map(const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                     int64_t expert_begin, int64_t expert_end, int64_t capacity) {
  MF_CHECK(num_tokens >= 0, "build_row_map: num_tokens ({}) must be >= 0", num_tokens);
  MF_CHECK(top_k >= 1, "build_row_map: top_k ({}) must be >= 1", top_k);
  MF_CHECK(expert_begin >= 0 && expert_begin <= expert_end,
           "build_row_map: expert range [{}, {}) is invalid", expert_begin, expert_end);

  MF_CHECK(num_tokens * top_k <= INT32_MAX,
           "build_row_map: {} tokens x top_k {} exceed the int32 row index range", num_tokens,
           top_k);

  RowMap map;
  map.num_tokens = num_tokens;
  map.top_k = top_k;
  map.expert_begin = expert_begin;
  map.expert_end = expert_end;
  const int64_t num_local = expert_end - expert_begin;
  const int64_t num_assignments = num_tokens * top_k;

  map.tokens_per_expert.assign(static_cast<size_t>(num_local), 0);
  for (int64_t a = 0; a < num_assignments; ++a) {
    const int32_t e = expert_idx[a];
    MF_CHECK(e >= 0, "build_row_map: expert index of token {} slot {} is {} (must be >= 0)",
             a / top_k, a % top_k, e);
    if (e >= expert_begin && e < expert_end) ++map.tokens_per_expert[e - expert_begin];
  }

  map.expert_offsets.assign(static_cast<size_t>(num_local + 1), 0);
  for (int64_t e = 0; e < num_local; ++e) {
    const int64_t routed = map.tokens_per_expert[e];
    const int64_t kept = capacity < 0 ? routed : std::min(routed, capacity);
    map.expert_offsets[e + 1] = map.expert_offsets[e] + kept;
  }

  // Walking the assignments in (token, slot) order fills each expert's rows in token order, so
  // the first `capacity` tokens of an expert keep their rows and later ones are dropped.
  map.row_token.assign(static_cast<size_t>(map.expert_offsets[num_local]), 0);
  map.assignment_row.assign(static_cast<size_t>(num_assignments), -1);
  std::vector<int64_t> next_row(map.expert_offsets.begin(), map.expert_offsets.end() - 1);
  for (int64_t a = 0; a < num_assignments; ++a) {
    const int64_t e = expert_idx[a];
    if (e < expert_begin || e >= expert_end) continue;
    const int64_t local = e - expert_begin;
    if (next_row[local] == map.expert_offsets[local + 1]) {
      ++map.num_dropped;
      continue;
    }
    const int64_t row = next_row[local]++;
    map.row_token[row] = static_cast<int32_t>(a / top_k);
    map.assignment_row[a] = static_cast<int32_t>(row);
  }
  return map;
}

}  // namespace moeforge::ops
