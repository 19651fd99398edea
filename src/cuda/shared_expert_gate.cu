// The shared expert's sigmoid gate: one block per token for the forward and the backward (a
// fixed-order block sum of the token's dot product, then an elementwise pass over its row), and a
// two-stage column sum for the gate weight's gradient.
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"
#include "cuda/reductions.h"
#include "cuda/shared_expert_gate.h"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kRowsPerChunk = 256;  // rows summed by one thread of the weight gradient
static_assert(kThreads % kWarpSize == 0, "whole warps per block");

__global__ void gate_forward_kernel(float* out, float* score, const bf16* x, const bf16* w,
                                    const bf16* shared_out, int64_t h) {
  __shared__ float partials[kThreads / kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * h;
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    dot += __bfloat162float(x[row + i]) * __bfloat162float(w[i]);
  }
  const float s = 1.0f / (1.0f + expf(-block_reduce<false, kThreads>(dot, partials)));
  if (threadIdx.x == 0) score[blockIdx.x] = s;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    out[row + i] += s * __bfloat162float(shared_out[row + i]);
  }
}

__global__ void gate_backward_kernel(bf16* dshared_out, float* dlogit, float* dx, const float* dout,
                                     const bf16* shared_out, const float* score, const bf16* w,
                                     int64_t h) {
  __shared__ float partials[kThreads / kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * h;
  const float s = score[blockIdx.x];
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    const float dy = dout[row + i];
    dot += dy * __bfloat162float(shared_out[row + i]);
    dshared_out[row + i] = __float2bfloat16_rn(s * dy);
  }
  const float dl = block_reduce<false, kThreads>(dot, partials) * s * (1.0f - s);
  if (threadIdx.x == 0) dlogit[blockIdx.x] = dl;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) dx[row + i] += dl * __bfloat162float(w[i]);
}

// partial[chunk, j] = sum over the chunk's rows r (in order) of dlogit[r] * x[r, j].
__global__ void gate_weight_partial_kernel(float* partial, const float* dlogit, const bf16* x,
                                           int64_t n, int64_t h) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (j >= h) return;
  const int64_t end = min(n, (chunk + 1) * kRowsPerChunk);
  float sum = 0.0f;
  for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) {
    sum += dlogit[r] * __bfloat162float(x[r * h + j]);
  }
  partial[chunk * h + j] = sum;
}

void check_dims(const char* what, int64_t n, int64_t h) {
  MF_CHECK(n >= 0 && n <= (int64_t{1} << 31) - 1 && h > 0,
           "{}: needs 0 <= tokens < 2^31 and hidden > 0, got {} tokens of hidden {}", what, n, h);
}

}  // namespace

void shared_expert_gate_forward(float* out, float* score, const bf16* x, const bf16* w,
                                const bf16* shared_out, int64_t n, int64_t h, cudaStream_t stream) {
  check_dims("shared_expert_gate_forward", n, h);
  if (n == 0) return;
  gate_forward_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(out, score, x, w,
                                                                         shared_out, h);
  MF_CUDA_CHECK_LAUNCH();
}

void shared_expert_gate_backward(bf16* dshared_out, float* dlogit, float* dx, const float* dout,
                                 const bf16* shared_out, const float* score, const bf16* w,
                                 int64_t n, int64_t h, cudaStream_t stream) {
  check_dims("shared_expert_gate_backward", n, h);
  if (n == 0) return;
  gate_backward_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      dshared_out, dlogit, dx, dout, shared_out, score, w, h);
  MF_CUDA_CHECK_LAUNCH();
}

void shared_expert_gate_backward_weight(float* dw, const float* dlogit, const bf16* x, int64_t n,
                                        int64_t h, cudaStream_t stream) {
  check_dims("shared_expert_gate_backward_weight", n, h);
  if (n == 0) return;
  const int64_t num_chunks = ceil_div(n, kRowsPerChunk);
  MF_CHECK(num_chunks <= 65535,
           "shared_expert_gate_backward_weight: {} tokens exceed {} chunks of {}", n, 65535,
           kRowsPerChunk);
  DeviceBuffer<float> partial(static_cast<size_t>(num_chunks * h));  // [num_chunks, h]
  const dim3 grid(static_cast<unsigned>(ceil_div(h, kThreads)), static_cast<unsigned>(num_chunks));
  gate_weight_partial_kernel<<<grid, kThreads, 0, stream>>>(partial.data(), dlogit, x, n, h);
  MF_CUDA_CHECK_LAUNCH();
  accumulate_chunk_sums(dw, partial.data(), num_chunks, h, stream);
}

}  // namespace moeforge::cuda
