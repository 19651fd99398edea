// Fused AdamW kernel: one pass reads grad, m, v, param and writes m, v, param and its bf16 copy.
// The bulk of a range runs four elements per thread with 16-byte loads and stores; an unaligned
// head and the tail run one element per thread, with the same arithmetic.
#include <cstdint>

#include "cuda/adamw.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

struct Moments {
  float m, v, p;
};

__device__ __forceinline__ Moments adamw_element(float p, float m, float v, float grad,
                                                 const AdamWStep& step, float decay_factor) {
  const float g = grad * step.grad_scale;
  m = step.beta1 * m + (1.0f - step.beta1) * g;
  v = step.beta2 * v + (1.0f - step.beta2) * g * g;
  const float denom = sqrtf(v) / step.bc2_sqrt + step.eps;
  return {m, v, p * decay_factor - step.step_size * m / denom};
}

__global__ void adamw_kernel(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                             const float* grads, int64_t count, const AdamWStep* step_ptr,
                             bool decay) {
  const AdamWStep step = *step_ptr;
  if (step.skip != 0) return;
  const float decay_factor = decay ? step.decay_factor : step.no_decay_factor;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Moments r =
        adamw_element(params[i], exp_avg[i], exp_avg_sq[i], grads[i], step, decay_factor);
    exp_avg[i] = r.m;
    exp_avg_sq[i] = r.v;
    params[i] = r.p;
    if (params_bf16 != nullptr) params_bf16[i] = __float2bfloat16_rn(r.p);
  }
}

// count4 groups of four elements; every pointer 16-byte aligned (params_bf16 8-byte aligned).
__global__ void adamw_kernel_x4(float4* params, uint2* params_bf16, float4* exp_avg,
                                float4* exp_avg_sq, const float4* grads, int64_t count4,
                                const AdamWStep* step_ptr, bool decay) {
  const AdamWStep step = *step_ptr;
  if (step.skip != 0) return;
  const float decay_factor = decay ? step.decay_factor : step.no_decay_factor;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 p = params[i], m = exp_avg[i], v = exp_avg_sq[i], g = grads[i];
    const Moments r0 = adamw_element(p.x, m.x, v.x, g.x, step, decay_factor);
    const Moments r1 = adamw_element(p.y, m.y, v.y, g.y, step, decay_factor);
    const Moments r2 = adamw_element(p.z, m.z, v.z, g.z, step, decay_factor);
    const Moments r3 = adamw_element(p.w, m.w, v.w, g.w, step, decay_factor);
    exp_avg[i] = make_float4(r0.m, r1.m, r2.m, r3.m);
    exp_avg_sq[i] = make_float4(r0.v, r1.v, r2.v, r3.v);
    params[i] = make_float4(r0.p, r1.p, r2.p, r3.p);
    if (params_bf16 != nullptr) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(r0.p, r1.p);
      const __nv_bfloat162 hi = __floats2bfloat162_rn(r2.p, r3.p);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      params_bf16[i] = packed;
    }
  }
}

constexpr int kThreads = 256;

__global__ void finish_grad_clipping_kernel(double* norm_out, AdamWStep* step, const double* slots,
                                            const uint8_t* expert_slot, int64_t num_slots,
                                            double max_norm) {
  double replicated = 0.0, experts = 0.0;
  for (int64_t i = 0; i < num_slots; ++i) (expert_slot[i] != 0 ? experts : replicated) += slots[i];
  const double norm = sqrt(replicated + experts);
  const bool finite = isfinite(norm);
  double factor = 1.0;
  if (finite && max_norm > 0.0 && norm > max_norm) factor = max_norm / (norm + 1e-6);
  *norm_out = norm;
  step->grad_scale = static_cast<float>(factor);
  step->skip = finite ? 0 : 1;
}

void launch_scalar(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                   const float* grads, int64_t count, const AdamWStep* step, bool decay,
                   cudaStream_t stream) {
  if (count == 0) return;
  adamw_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(
      params, params_bf16, exp_avg, exp_avg_sq, grads, count, step, decay);
  MF_CUDA_CHECK_LAUNCH();
}

// Elements before params reaches a 16-byte boundary, when all arrays reach it at the same element
// (the flat buffers come from the 256-byte aligned allocator, so they do); -1 otherwise.
int64_t aligned_head(const float* params, const bf16* params_bf16, const float* exp_avg,
                     const float* exp_avg_sq, const float* grads) {
  const auto misalign = [](const void* p, uintptr_t bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes;
  };
  const uintptr_t off = misalign(params, 16);
  if (off % sizeof(float) != 0) return -1;
  const int64_t head = static_cast<int64_t>((16 - off) % 16 / sizeof(float));
  for (const float* p : {exp_avg, exp_avg_sq, grads}) {
    if (misalign(p, 16) != off) return -1;
  }
  if (params_bf16 != nullptr && misalign(params_bf16 + head, 8) != 0) return -1;
  return head;
}

}  // namespace

void adamw_update(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                  const float* grads, int64_t count, const AdamWStep* step, bool decay,
                  cudaStream_t stream) {
  if (count == 0) return;
  MF_CHECK(step != nullptr, "adamw_update needs its step constants in device memory");
  int64_t head = aligned_head(params, params_bf16, exp_avg, exp_avg_sq, grads);
  if (head < 0 || head >= count) {
    launch_scalar(params, params_bf16, exp_avg, exp_avg_sq, grads, count, step, decay, stream);
    return;
  }
  launch_scalar(params, params_bf16, exp_avg, exp_avg_sq, grads, head, step, decay, stream);
  const int64_t count4 = (count - head) / 4;
  if (count4 > 0) {
    adamw_kernel_x4<<<grid_for(count4, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<float4*>(params + head),
        params_bf16 == nullptr ? nullptr : reinterpret_cast<uint2*>(params_bf16 + head),
        reinterpret_cast<float4*>(exp_avg + head), reinterpret_cast<float4*>(exp_avg_sq + head),
        reinterpret_cast<const float4*>(grads + head), count4, step, decay);
    MF_CUDA_CHECK_LAUNCH();
  }
  const int64_t done = head + 4 * count4;
  launch_scalar(params + done, params_bf16 == nullptr ? nullptr : params_bf16 + done,
                exp_avg + done, exp_avg_sq + done, grads + done, count - done, step, decay, stream);
}

void finish_grad_clipping(double* norm, AdamWStep* step, const double* slots,
                          const uint8_t* expert_slot, int64_t num_slots, double max_norm,
                          cudaStream_t stream) {
  finish_grad_clipping_kernel<<<1, 1, 0, stream>>>(norm, step, slots, expert_slot, num_slots,
                                                   max_norm);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
