// SwiGLU kernels: elementwise, fp32 math; 8 elements per thread and 16-byte accesses where the
// count and the pointers allow, else one element per thread (the same arithmetic either way).
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/swiglu.h"

namespace moeforge::cuda {
namespace {

constexpr int kVec = 8;

__device__ __forceinline__ float swiglu_value(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}

// d/dgate and d/dup of silu(g) * u for upstream dy.
__device__ __forceinline__ void swiglu_grads(float& dg, float& du, float dy, float g, float u) {
  const float sig = 1.0f / (1.0f + expf(-g));
  du = dy * (g * sig);
  dg = dy * u * sig * (1.0f + g * (1.0f - sig));
}

__global__ void swiglu_forward_kernel(bf16* out, const bf16* gate, const bf16* up, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(swiglu_value(__bfloat162float(gate[i]), __bfloat162float(up[i])));
  }
}

__global__ void swiglu_forward_vec_kernel(bf16* out, const bf16* gate, const bf16* up,
                                          int64_t num_vecs) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < num_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g[kVec], u[kVec], y[kVec];
    load_vec(g, gate + v * kVec);
    load_vec(u, up + v * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) y[i] = swiglu_value(g[i], u[i]);
    store_vec(out + v * kVec, y);
  }
}

__global__ void swiglu_backward_kernel(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                       const bf16* up, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dg, du;
    swiglu_grads(dg, du, __bfloat162float(dout[i]), __bfloat162float(gate[i]),
                 __bfloat162float(up[i]));
    dup[i] = __float2bfloat16_rn(du);
    dgate[i] = __float2bfloat16_rn(dg);
  }
}

__global__ void swiglu_backward_vec_kernel(bf16* dgate, bf16* dup, const bf16* dout,
                                           const bf16* gate, const bf16* up, int64_t num_vecs) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < num_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dy[kVec], g[kVec], u[kVec], dg[kVec], du[kVec];
    load_vec(dy, dout + v * kVec);
    load_vec(g, gate + v * kVec);
    load_vec(u, up + v * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) swiglu_grads(dg[i], du[i], dy[i], g[i], u[i]);
    store_vec(dup + v * kVec, du);
    store_vec(dgate + v * kVec, dg);
  }
}

constexpr int kThreads = 256;

}  // namespace

void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, int64_t count,
                    cudaStream_t stream) {
  if (count == 0) return;
  if (count % kVec == 0 && aligned_to(16, out, gate, up)) {
    const int64_t num_vecs = count / kVec;
    swiglu_forward_vec_kernel<<<grid_for(num_vecs, kThreads), kThreads, 0, stream>>>(out, gate, up,
                                                                                     num_vecs);
  } else {
    swiglu_forward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(out, gate, up, count);
  }
  MF_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  if (count % kVec == 0 && aligned_to(16, dgate, dup, dout, gate, up)) {
    const int64_t num_vecs = count / kVec;
    swiglu_backward_vec_kernel<<<grid_for(num_vecs, kThreads), kThreads, 0, stream>>>(
        dgate, dup, dout, gate, up, num_vecs);
  } else {
    swiglu_backward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(dgate, dup, dout,
                                                                               gate, up, count);
  }
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
