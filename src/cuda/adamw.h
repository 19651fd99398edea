// Fused AdamW on the GPU over one contiguous range of the flat fp32 parameter buffer, with the
// same arithmetic as train/adamw.cpp (decoupled decay, bias correction), the gradient scaled by
// the clipping factor on the fly, and the bf16 weight copy written in the same pass.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

struct AdamWStep {
  float beta1, beta2, eps;
  float step_size;     // lr / (1 - beta1^t)
  float bc2_sqrt;      // sqrt(1 - beta2^t)
  float decay_factor;  // 1 - lr * weight_decay, or 1 for tensors without decay
  float grad_scale;    // clipping factor (1 when not clipped)
};

// params, exp_avg, exp_avg_sq updated in place over [count]; params_bf16 (may be null) receives
// the rounded new parameters.
void adamw_update(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                  const float* grads, int64_t count, const AdamWStep& step, cudaStream_t stream);

}  // namespace moeforge::cuda
