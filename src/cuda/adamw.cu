// Fused AdamW kernel: one pass reads grad, m, v, param and writes m, v, param and its bf16 copy.
#include "cuda/adamw.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

__global__ void adamw_kernel(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                             const float* grads, int64_t count, AdamWStep step) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = grads[i] * step.grad_scale;
    const float m = exp_avg[i] = step.beta1 * exp_avg[i] + (1.0f - step.beta1) * g;
    const float v = exp_avg_sq[i] = step.beta2 * exp_avg_sq[i] + (1.0f - step.beta2) * g * g;
    const float denom = sqrtf(v) / step.bc2_sqrt + step.eps;
    const float p = params[i] * step.decay_factor - step.step_size * m / denom;
    params[i] = p;
    if (params_bf16 != nullptr) params_bf16[i] = __float2bfloat16_rn(p);
  }
}

}  // namespace

void adamw_update(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                  const float* grads, int64_t count, const AdamWStep& step, cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kThreads = 256;
  adamw_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(params, params_bf16, exp_avg,
                                                                   exp_avg_sq, grads, count, step);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
