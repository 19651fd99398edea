// RMSNorm on the GPU (ops/rmsnorm.h is the spec): fp32 statistics, one warp per row.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// out [n, c] (bf16) = inp * rstd * weight; rstd [n] saved. In is float (the residual stream) or
// bf16 (per-head q/k norm).
template <typename In>
void rmsnorm_forward(bf16* out, float* rstd, const In* inp, const float* weight, int64_t n,
                     int64_t c, float eps, cudaStream_t stream);

// dinp [n, c]: assigned, or added to when accumulate (the residual stream's gradient).
// dweight [c] += (deterministic: fixed-order partial sums over row ranges that depend only on n
// and c, see rmsnorm_dweight_split). Instantiated for
// <float, float, float> (residual norms: fp32 dout and dinp) and <bf16, bf16, bf16> (q/k norm).
// dinp_bf16, if not null: also the final dinp rounded to bf16 (the next GEMM's input, without a
// cast kernel reading dinp again).
template <typename In, typename DOut, typename DIn>
void rmsnorm_backward(DIn* dinp, float* dweight, const DOut* dout, const In* inp,
                      const float* weight, const float* rstd, int64_t n, int64_t c, bool accumulate,
                      cudaStream_t stream, bf16* dinp_bf16 = nullptr);

// The widest rows whose weight gradient the backward kernel sums itself (its block keeps 8 * c
// floats of shared memory: 64 KB, within every supported GPU's opt-in limit); wider rows take a
// second kernel that reads dout and inp again.
constexpr int64_t kRmsNormFusedMaxColumns = 2048;

// How rmsnorm_backward splits dweight into partial sums: num_partials ranges of rows_per_partial
// rows (the last one shorter), summed in range order; fused: by the backward kernel itself.
struct RmsNormDweightSplit {
  bool fused = false;
  int64_t rows_per_partial = 0;
  int64_t num_partials = 0;
};
RmsNormDweightSplit rmsnorm_dweight_split(int64_t n, int64_t c);

}  // namespace moeforge::cuda
