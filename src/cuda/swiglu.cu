// SwiGLU kernels: elementwise, fp32 math; 8 elements per thread and 16-byte accesses where the
// count (the row width, when only some rows are used) and the pointers allow, else one element per
// thread (the same arithmetic either way). The grid covers every row; with used_rows the kernels
// stop at the used rows' elements, read on the device.
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

// The elements in use of [count / width, width]: the first *used_rows rows, or all (null).
__device__ __forceinline__ int64_t used_elements(const int32_t* used_rows, int64_t width,
                                                 int64_t count) {
  return used_rows == nullptr ? count : min(count, static_cast<int64_t>(*used_rows) * width);
}

__global__ void swiglu_forward_kernel(bf16* out, const bf16* gate, const bf16* up,
                                      const int32_t* used_rows, int64_t width, int64_t count) {
  const int64_t end = used_elements(used_rows, width, count);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(swiglu_value(__bfloat162float(gate[i]), __bfloat162float(up[i])));
  }
}

// The used elements end on a vector boundary (vector_path).
__global__ void swiglu_forward_vec_kernel(bf16* out, const bf16* gate, const bf16* up,
                                          const int32_t* used_rows, int64_t width, int64_t count) {
  const int64_t num_vecs = used_elements(used_rows, width, count) / kVec;
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
                                       const bf16* up, const int32_t* used_rows, int64_t width,
                                       int64_t count) {
  const int64_t end = used_elements(used_rows, width, count);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dg, du;
    swiglu_grads(dg, du, __bfloat162float(dout[i]), __bfloat162float(gate[i]),
                 __bfloat162float(up[i]));
    dup[i] = __float2bfloat16_rn(du);
    dgate[i] = __float2bfloat16_rn(dg);
  }
}

// The used elements end on a vector boundary (vector_path).
__global__ void swiglu_backward_vec_kernel(bf16* dgate, bf16* dup, const bf16* dout,
                                           const bf16* gate, const bf16* up,
                                           const int32_t* used_rows, int64_t width, int64_t count) {
  const int64_t num_vecs = used_elements(used_rows, width, count) / kVec;
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

// Whether the 16-byte kernels can run: aligned tensors, and the end of the used elements on a
// vector boundary whatever it is (the count, or with used_rows every row's end).
template <typename... Ptrs>
bool vector_path(const int32_t* used_rows, int64_t width, int64_t count, const Ptrs*... ptrs) {
  return (used_rows == nullptr ? count : width) % kVec == 0 && aligned_to(16, ptrs...);
}

}  // namespace

void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, int64_t count,
                    cudaStream_t stream) {
  swiglu_forward(out, gate, up, nullptr, count, 1, stream);
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     int64_t count, cudaStream_t stream) {
  swiglu_backward(dgate, dup, dout, gate, up, nullptr, count, 1, stream);
}

void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, const int32_t* used_rows,
                    int64_t num_rows, int64_t width, cudaStream_t stream) {
  const int64_t count = num_rows * width;
  if (count == 0) return;
  if (vector_path(used_rows, width, count, out, gate, up)) {
    swiglu_forward_vec_kernel<<<grid_for(count / kVec, kThreads), kThreads, 0, stream>>>(
        out, gate, up, used_rows, width, count);
  } else {
    swiglu_forward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(
        out, gate, up, used_rows, width, count);
  }
  MF_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     const int32_t* used_rows, int64_t num_rows, int64_t width,
                     cudaStream_t stream) {
  const int64_t count = num_rows * width;
  if (count == 0) return;
  if (vector_path(used_rows, width, count, dgate, dup, dout, gate, up)) {
    swiglu_backward_vec_kernel<<<grid_for(count / kVec, kThreads), kThreads, 0, stream>>>(
        dgate, dup, dout, gate, up, used_rows, width, count);
  } else {
    swiglu_backward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(
        dgate, dup, dout, gate, up, used_rows, width, count);
  }
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
