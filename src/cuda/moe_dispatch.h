// Dispatch and combine of the MoE FFN on the GPU (ops/row_map.h and ops/permute.h are the spec):
// the row map (rows sorted by expert, then token, then slot; with a capacity, each expert's
// earliest tokens only), scatter of token rows into that order, and the gate-weighted gather
// back, with their backwards.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// Device int32s of scratch that build_row_map and build_local_row_map need for num_assignments
// (n * k) assignments over num_experts experts (num_local for the local map): per-tile counts.
// The caller owns it (allocated once, not per call: the caching allocator is not stream-aware, so a
// temporary freed on return could be handed to another stream while the map's kernels still run)
// and must not reuse it before those kernels are done (the next map on the same stream is).
int64_t row_map_scratch_ints(int64_t num_assignments, int64_t num_experts);

// expert_idx [n, k] -> expert_offsets [E + 1] (row ranges per expert), assignment_row [n * k]
// and row_token [n * k]. Deterministic (a stable counting sort). capacity >= 0 keeps at most
// capacity rows per expert, the earliest tokens' (ops::build_row_map's rule): a dropped
// assignment's row is -1, and the rows past expert_offsets[E] are unused, their row_token -1.
// scratch: row_map_scratch_ints(n * k, E). kept_before [E] (device, or null) carries the capacity
// across chunks of one forward's tokens: expert e keeps at most capacity - kept_before[e] rows of
// this chunk, and kept_before[e] grows by what it keeps.
void build_row_map(int32_t* expert_offsets, int32_t* assignment_row, int32_t* row_token,
                   int32_t* scratch, const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                   int64_t num_experts, int64_t capacity, cudaStream_t stream,
                   int32_t* kept_before = nullptr);

// The row map of the experts [expert_begin, expert_begin + num_local) only (expert parallelism:
// this rank's experts): expert_offsets [num_local + 1] over local expert indices, assignments to
// other experts dropped (row -1) like those past the capacity; local_idx [n * k] is scratch (the
// assignments' local expert, or -1), and so is scratch (row_map_scratch_ints(n * k, num_local)).
// The same rows, in the same order, as ops::build_row_map with that expert range.
void build_local_row_map(int32_t* expert_offsets, int32_t* assignment_row, int32_t* row_token,
                         int32_t* local_idx, int32_t* scratch, const int32_t* expert_idx,
                         int64_t num_tokens, int64_t top_k, int64_t expert_begin, int64_t num_local,
                         int64_t capacity, cudaStream_t stream);

// rows[r, :] = x[row_token[r], :], or zeros where row_token[r] < 0 (an unused row)
// x [n, c], rows [num_rows, c].
void scatter_rows(bf16* rows, const bf16* x, const int32_t* row_token, int64_t num_rows, int64_t c,
                  cudaStream_t stream);
// The same for the rows [0, *used_rows) only (a row map's expert_offsets[E]: the rows any expert
// has). used_rows is a device int32 (at most num_rows) that the kernel reads, so the host never
// waits for it; the rows past it are neither read nor written (neither row_token nor rows).
void scatter_rows(bf16* rows, const bf16* x, const int32_t* row_token, const int32_t* used_rows,
                  int64_t num_rows, int64_t c, cudaStream_t stream);
// dx[t, :] (fp32, assigned) = sum over slots j of drows[assignment_row[t * k + j], :].
void scatter_rows_backward(float* dx, const bf16* drows, const int32_t* assignment_row,
                           int64_t num_tokens, int64_t top_k, int64_t c, cudaStream_t stream);

// out[t, :] (fp32) = residual[t, :] + sum_j gates[t, j] * rows[assignment_row[t * k + j], :].
void combine_rows(float* out, const float* residual, const bf16* rows, const float* gates,
                  const int32_t* assignment_row, int64_t num_tokens, int64_t top_k, int64_t c,
                  cudaStream_t stream);
// drows[r] (bf16, assigned) = gates[t, j] * dout[t]; dgates[t, j] (assigned) = dot(dout[t],
// rows[r]) for r = assignment_row[t * k + j].
void combine_rows_backward(bf16* drows, float* dgates, const float* dout, const bf16* rows,
                           const float* gates, const int32_t* assignment_row, int64_t num_tokens,
                           int64_t top_k, int64_t c, cudaStream_t stream);

}  // namespace moeforge::cuda
