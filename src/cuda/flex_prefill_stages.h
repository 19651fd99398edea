// The stages of the GPU FlexPrefill pattern search (cuda/flex_prefill.h) that its exact and fp32
// step 1-2 implementations share: the selection's shape and buffers, the dense fallback, block
// means, the last block's query mean, the chunked coverage counts of step 2, steps 4-5 (the head
// decision), and steps 2 (budgets from coverage counts) and 6-8 ending in the CSR. Everything here
// computes the reference's doubles in the reference's order (ops/flex_prefill.h), except step 8's
// logits and coverage walk when params.search is FlexSearch::kFp32 (fp32 logits and the fixed-point
// select of cuda/coverage_select.h, as cuda/flex_prefill_fp32.h describes), and is asynchronous on
// the stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"
#include "cuda/flex_prefill.h"
#include "ops/flex_prefill.h"

namespace moeforge::cuda::flex {

struct SearchShape {
  int64_t seq_len, num_q_heads, num_kv_heads, head_dim, block_size, num_blocks, group_size;
  int64_t min_blocks, max_blocks;  // the budget clamp of step 2, in blocks
  double scale;                    // 1 / sqrt(head_dim), computed on the host as the reference does
};

// Checks dims and params with the reference's messages and the limits of cuda/flex_prefill.h
// (`who` names the caller in the messages) and returns the shape.
SearchShape search_shape(const ops::SparseAttentionDims& dims, const ops::FlexPrefillParams& params,
                         const char* who);

// Sizes every buffer of out for shape s and sets its dense_fallback flag (step 0); when it is set,
// also writes the dense selection and its statistics. Returns out.dense_fallback.
bool begin_selection(FlexPrefillDeviceSelection& out, const SearchShape& s, cudaStream_t stream);

// means [num_heads, nb, D]: per block, the mean of x[:, head, :] over the block's real rows, times
// factor (rows in ascending order, then times factor / length, as the reference). Heads whose flag
// in active is 0 are skipped (active == nullptr: every head).
void block_means(double* means, const bf16* x, int64_t num_heads, double factor,
                 const int32_t* active, const SearchShape& s, cudaStream_t stream);

// q_mean [Hq, D]: the mean over the last block's rows of scale * q (step 4's query).
void last_query_mean(double* q_mean, const bf16* q, const SearchShape& s, cudaStream_t stream);

// counts [num_segments] = for each segment of values [num_segments, segment_size] (>= +0.0, no
// NaN), the number of its values sorted descending whose chunked cumulative sum stays <= limit
// (ops::flex_prefill_coverage_prefix).
void chunked_coverage_counts(unsigned long long* counts, const double* values, int64_t num_segments,
                             int64_t segment_size, double limit, cudaStream_t stream);

// Step 4's block probabilities: probabilities [Hq, nb] = per head the softmax over the key blocks
// of q_mean . Kbar, from k_means [Hkv, nb, D] and q_mean [Hq, D] as block_means and last_query_mean
// give them (it needs neither step 1 nor step 3, so the fast search runs it beside its passes).
void block_probabilities(double* probabilities, const double* k_means, const double* q_mean,
                         const SearchShape& s, cudaStream_t stream);

// Steps 4 (the JS decision) and 5 into out (sized by begin_selection): query_aware and js_distance
// per head, from pooled [Hq, 2, nb] (vertical_blk and slash_blk; step 5 sets their always-kept
// entries to +inf in place) and probabilities as block_probabilities gives them.
void decide_heads(FlexPrefillDeviceSelection& out, double* pooled, const double* probabilities,
                  const SearchShape& s, double tau, cudaStream_t stream);

// Steps 2 (budgets from coverage counts) and 6-8 and the CSR of out, after decide_heads: pooled as
// decide_heads leaves it; coverage_counts [Hq, 2] the counts of step 2 for vertical and slash (c -
// 1 in the reference's notation; read only for heads that are not query-aware); k_means as for
// block_probabilities; for FlexSearch::kFp32 with tau > 0, fp32_tri [Hq, nb (nb + 1) / 2] step 8's
// probabilities as fp32_block_softmax (cuda/flex_prefill_fp32.h) leaves them, at least for the
// query-aware heads (unused otherwise, may be null).
// FlexSearch::kFp32 also computes the counts here (fp32_coverage_counts into coverage_counts from
// fp32_vs [Hq, 2, N], as fp32_vertical_slash gives it): step 2 and the budgets' top-k (steps 6-7)
// run on the side stream (cuda/side_stream.h) beside step 8, and meet it at the CSR; its coverage
// selects of steps 2 and 8 take select_path. The exact search passes fp32_vs null and its counts.
void finish_selection(FlexPrefillDeviceSelection& out, const double* pooled,
                      unsigned long long* coverage_counts, const float* fp32_vs, const bf16* q,
                      const double* k_means, const float* fp32_tri, const SearchShape& s,
                      const ops::FlexPrefillParams& params, cudaStream_t stream,
                      SelectPath select_path);

}  // namespace moeforge::cuda::flex
