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
// dweight [c] += (deterministic: fixed-order partial sums). Instantiated for
// <float, float, float> (residual norms: fp32 dout and dinp) and <bf16, bf16, bf16> (q/k norm).
// dinp_bf16, if not null: also the final dinp rounded to bf16 (the next GEMM's input, without a
// cast kernel reading dinp again).
template <typename In, typename DOut, typename DIn>
void rmsnorm_backward(DIn* dinp, float* dweight, const DOut* dout, const In* inp,
                      const float* weight, const float* rstd, int64_t n, int64_t c, bool accumulate,
                      cudaStream_t stream, bf16* dinp_bf16 = nullptr);

}  // namespace moeforge::cuda
