// SwiGLU kernels: elementwise, fp32 math.
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/swiglu.h"

namespace moeforge::cuda {
namespace {

__global__ void swiglu_forward_kernel(bf16* out, const bf16* gate, const bf16* up, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(gate[i]);
    const float silu = g / (1.0f + expf(-g));
    out[i] = __float2bfloat16_rn(silu * __bfloat162float(up[i]));
  }
}

__global__ void swiglu_backward_kernel(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                       const bf16* up, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(gate[i]);
    const float u = __bfloat162float(up[i]);
    const float dy = __bfloat162float(dout[i]);
    const float sig = 1.0f / (1.0f + expf(-g));
    const float silu = g * sig;
    dup[i] = __float2bfloat16_rn(dy * silu);
    dgate[i] = __float2bfloat16_rn(dy * u * sig * (1.0f + g * (1.0f - sig)));
  }
}

constexpr int kThreads = 256;

}  // namespace

void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, int64_t count,
                    cudaStream_t stream) {
  if (count == 0) return;
  swiglu_forward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(out, gate, up, count);
  MF_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  swiglu_backward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(dgate, dup, dout, gate,
                                                                             up, count);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
