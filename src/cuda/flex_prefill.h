// FlexPrefill pattern search on the GPU (ops/flex_prefill.h is the spec): the per-head causal block
// sets as CSR plus per-head statistics, from bf16 q and k, on the device, with no host sync.
// params.search picks how steps 1-2 run: FlexSearch::kExact (below) or FlexSearch::kFp32 (bf16
// tensor cores and fp32, cuda/flex_prefill_fp32.h: the reference's selection except for decisions
// within the derived fp32 noise of their thresholds); steps 0 and 4-8 are the same code in both
// (cuda/flex_prefill_stages.h) except step 8's block logits, which kFp32 forms in fp32, and its
// coverage walk, which kFp32 runs in fixed point.
//
// With kExact, the same selection as ops::flex_prefill_select on the same bf16-rounded q and k:
// every quantity is the reference's double, in the reference's order (ascending dot products, the
// chunked order of the long sums, sequential sums elsewhere), and every sort uses the reference's
// rule (larger value first, equal values by the lower index). It relies on the exactness facts that
// ops/flex_prefill.h lists: bf16 products are exact in double, so step 1's logits use fused
// multiply-adds; products of doubles are computed without them; maxima are order-free; masked
// entries may be added as +0.0; the sorted values are never -0.0 or NaN, so stable radix sorts give
// the reference's order. Only exp and log may differ from the host's libm by an ulp, so decisions
// that sit within rounding of a threshold can still differ (gamma = 1 makes the last entry of each
// coverage sum such a decision).
//
// Speed of kExact (cuda/flex_prefill.cu): step 1 is an fp64 GEMM of the last block's queries
// against all keys (shared-memory tiles, 8 x 8 register tiles, 2 bs D N flops per head), whose
// logits are stored in a [heads, keys, bs] double buffer of at most 4 GiB (heads in passes) and
// read twice more; the long sums run chunk-parallel; the N-long and triangle sorts are stable CUB
// radix sorts over all segments at once, the block scores a block radix sort per head and kind.
//
// Limits (checked, moeforge::Error; kFp32 adds its own, cuda/flex_prefill_fp32.h): 1 <= head_dim <=
// kFlexPrefillMaxHeadDim, num_q_heads <= kFlexPrefillMaxHeads and ceil(seq_len / block_size) <=
// kFlexPrefillMaxBlocks (the sort keys pack head and position into 32 bits). Unlike the reference,
// q and k are not checked for non-finite entries (that would need a host sync): they give an
// unspecified selection. The dense fallback of step 0 is decided on the host from the shapes alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"
#include "cuda/coverage_select.h"
#include "cuda/device_memory.h"
#include "ops/flex_prefill.h"

namespace moeforge::cuda {

constexpr int64_t kFlexPrefillMaxHeadDim = 256;
constexpr int64_t kFlexPrefillMaxBlocks = 2048;  // 256K tokens at block size 128
constexpr int64_t kFlexPrefillMaxHeads = 1024;

// The selection on the device; the layout of ops::BlockSparseLayout and ops::FlexPrefillHeadStats.
struct FlexPrefillDeviceSelection {
  bool dense_fallback = false;
  int64_t num_heads = 0;   // query heads
  int64_t num_blocks = 0;  // ceil(seq_len / block_size)
  int64_t block_size = 0;
  DeviceBuffer<int64_t> row_offsets;  // [num_heads * num_blocks + 1], row h * num_blocks + r
  // Capacity num_heads * num_blocks * (num_blocks + 1) / 2; the first row_offsets.back() are used.
  DeviceBuffer<int32_t> col_idx;
  DeviceBuffer<int32_t> query_aware;          // [num_heads], 1 or 0
  DeviceBuffer<double> js_distance;           // [num_heads], NaN on the dense fallback
  DeviceBuffer<int64_t> num_vertical_blocks;  // [num_heads], 0 on the dense fallback
  DeviceBuffer<int64_t> num_slash_blocks;     // [num_heads], 0 on the dense fallback
  DeviceBuffer<int64_t> num_selected_blocks;  // [num_heads]
};

// q [seq_len, num_q_heads, head_dim], k [seq_len, num_kv_heads, head_dim] (bf16, device).
// Resizes and assigns every buffer of out; asynchronous on stream. Throws moeforge::Error with the
// reference's messages for invalid dims or params, and for the limits above. select_path: how the
// fast search's coverage selects of steps 2 and 8 run (cuda/coverage_select.h; the same selection
// on every path, so a choice of speed only); the exact search sorts instead.
void flex_prefill_select(FlexPrefillDeviceSelection& out, const bf16* q, const bf16* k,
                         const ops::SparseAttentionDims& dims, const ops::FlexPrefillParams& params,
                         cudaStream_t stream, SelectPath select_path = SelectPath::automatic);

// Copies a selection to the host (synchronises the device), as the reference returns it.
ops::FlexPrefillSelection download_selection(const FlexPrefillDeviceSelection& selection);

}  // namespace moeforge::cuda
