// The two tensor-core passes of the fp32 FlexPrefill search (steps 1 and 3's inputs; see
// cuda/flex_prefill_fp32.h) as two families of kernels with one contract:
//  - pass 1 (row stats): partial [Hq, num_splits, bs] = per last-block row and key split of
//    kFp32SplitKeys keys, (max, sum of 2^(x - max)) of x = (q . k) * scale_log2 over the split's
//    keys that the row sees ((-inf, 0) when it sees none);
//  - pass 2 (scores), given lse2 [Hq * bs] = log2 of each row's sum of 2^x: vs [Hq, 2, N] kind 0 =
//    vertical (the column sums of p = 2^(x - lse2), / bs) and slash_part [Hq, num_splits,
//    kFp32SplitKeys + bs - 1] = the split's part of each diagonal sum.
// The mma.sync kernels (cuda/flex_prefill_fp32_scores.cu) run on sm_80 and later and any head_dim
// that is a multiple of 8; the Hopper kernels (cuda/flex_prefill_fp32_passes_sm90.cu: wgmma, TMA,
// a producer warp) on sm_90 at head_dim 64 and 128. Both sum each row's exponentials of a 64-key
// tile 16 per lane and keep the additions of every vertical and diagonal sum within the chain that
// the error bound of cuda/flex_prefill_fp32.h allows, so both meet it.
#pragma once

#include <cuda_runtime.h>
#include <vector_types.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

struct Fp32PassArgs {
  const bf16* q;  // [N, Hq, D]
  const bf16* k;  // [N, Hkv, D]
  int64_t seq_len, num_q_heads, num_kv_heads, head_dim, group_size, num_splits, block_size;
  int dim_pad;       // head_dim rounded up to 16 (the MMA's k)
  float scale_log2;  // scale * log2(e), rounded to fp32
};

// Whether the Hopper passes take these arguments on a device of compute capability major.x.
bool hopper_fp32_passes_run(const Fp32PassArgs& args, int device_major);

// The Hopper passes (asynchronous on the stream; hopper_fp32_passes_run must hold).
void launch_hopper_row_stats(float2* partial, const Fp32PassArgs& args, cudaStream_t stream);
void launch_hopper_scores(float* vs, float* slash_part, const float* lse2, const Fp32PassArgs& args,
                          cudaStream_t stream);

}  // namespace moeforge::cuda
