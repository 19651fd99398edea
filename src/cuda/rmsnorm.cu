// RMSNorm kernels: one warp per row (4 columns per lane and access where the width allows); the
// weight gradient by fixed-order partial sums over row chunks (no atomics, so results are
// reproducible).
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"
#include "cuda/reductions.h"
#include "cuda/rmsnorm.h"

namespace moeforge::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kRowsPerChunk = 256;  // rows per partial sum of dweight

// kWidth consecutive columns per lane and access: 1, or 4 when c % 4 == 0 and the tensors are
// aligned; the row's sums run over each lane's columns, then across the warp.
template <int kWidth, typename In>
__global__ void rmsnorm_forward_kernel(bf16* out, float* rstd, const In* inp, const float* weight,
                                       int64_t n, int64_t c, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= n) return;
  const In* x = inp + row * c;
  float sum_sq = 0.0f;
  for (int64_t j = lane * kWidth; j < c; j += kWarpSize * kWidth) {
    float v[kWidth];
    load_cols<kWidth>(v, x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) sum_sq += v[i] * v[i];
  }
  sum_sq = warp_sum(sum_sq);
  const float r = rsqrtf(sum_sq / static_cast<float>(c) + eps);
  if (lane == 0) rstd[row] = r;
  bf16* y = out + row * c;
  for (int64_t j = lane * kWidth; j < c; j += kWarpSize * kWidth) {
    float v[kWidth], w[kWidth];
    load_cols<kWidth>(v, x + j);
    load_cols<kWidth>(w, weight + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) v[i] = v[i] * r * w[i];
    store_cols<kWidth>(y + j, v);
  }
}

template <int kWidth, typename In, typename DOut, typename DIn>
__global__ void rmsnorm_backward_kernel(DIn* dinp, bf16* dinp_bf16, const DOut* dout, const In* inp,
                                        const float* weight, const float* rstd, int64_t n,
                                        int64_t c, bool accumulate) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= n) return;
  const In* x = inp + row * c;
  const DOut* dy = dout + row * c;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int64_t j = lane * kWidth; j < c; j += kWarpSize * kWidth) {
    float g[kWidth], w[kWidth], v[kWidth];
    load_cols<kWidth>(g, dy + j);
    load_cols<kWidth>(w, weight + j);
    load_cols<kWidth>(v, x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) dot += g[i] * w[i] * v[i];
  }
  dot = warp_sum(dot);
  const float coeff = r * r * r * dot / static_cast<float>(c);
  DIn* dx = dinp + row * c;
  for (int64_t j = lane * kWidth; j < c; j += kWarpSize * kWidth) {
    float g[kWidth], w[kWidth], v[kWidth], result[kWidth];
    load_cols<kWidth>(g, dy + j);
    load_cols<kWidth>(w, weight + j);
    load_cols<kWidth>(v, x + j);
    float prior[kWidth] = {};
    if (accumulate) load_cols<kWidth>(prior, dx + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) result[i] = r * w[i] * g[i] - coeff * v[i] + prior[i];
    store_cols<kWidth>(dx + j, result);
    if (dinp_bf16 != nullptr) store_cols<kWidth>(dinp_bf16 + row * c + j, result);
  }
}

// partial[chunk, j] = sum over the chunk's rows of dout * inp * rstd (column j).
template <typename In, typename DOut>
__global__ void rmsnorm_dweight_partial_kernel(float* partial, const DOut* dout, const In* inp,
                                               const float* rstd, int64_t n, int64_t c) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (j >= c) return;
  const int64_t row_end = min(n, (chunk + 1) * kRowsPerChunk);
  float sum = 0.0f;
  for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
    sum += to_float(dout[row * c + j]) * to_float(inp[row * c + j]) * rstd[row];
  }
  partial[chunk * c + j] = sum;
}

}  // namespace

template <typename In>
void rmsnorm_forward(bf16* out, float* rstd, const In* inp, const float* weight, int64_t n,
                     int64_t c, float eps, cudaStream_t stream) {
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(ceil_div(n, kWarpsPerBlock));
  if (c % 4 == 0 && aligned_to(16, out, inp, weight)) {
    rmsnorm_forward_kernel<4>
        <<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(out, rstd, inp, weight, n, c, eps);
  } else {
    rmsnorm_forward_kernel<1>
        <<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(out, rstd, inp, weight, n, c, eps);
  }
  MF_CUDA_CHECK_LAUNCH();
}

template <typename In, typename DOut, typename DIn>
void rmsnorm_backward(DIn* dinp, float* dweight, const DOut* dout, const In* inp,
                      const float* weight, const float* rstd, int64_t n, int64_t c, bool accumulate,
                      cudaStream_t stream, bf16* dinp_bf16) {
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(ceil_div(n, kWarpsPerBlock));
  if (c % 4 == 0 && aligned_to(16, dinp, dout, inp, weight) && aligned_to(8, dinp_bf16)) {
    rmsnorm_backward_kernel<4><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        dinp, dinp_bf16, dout, inp, weight, rstd, n, c, accumulate);
  } else {
    rmsnorm_backward_kernel<1><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        dinp, dinp_bf16, dout, inp, weight, rstd, n, c, accumulate);
  }
  MF_CUDA_CHECK_LAUNCH();
  const int64_t num_chunks = ceil_div(n, kRowsPerChunk);
  DeviceBuffer<float> partial(static_cast<size_t>(num_chunks * c));
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(ceil_div(c, kThreads)), static_cast<unsigned>(num_chunks));
  rmsnorm_dweight_partial_kernel<<<grid, kThreads, 0, stream>>>(partial.data(), dout, inp, rstd, n,
                                                                c);
  MF_CUDA_CHECK_LAUNCH();
  accumulate_chunk_sums(dweight, partial.data(), num_chunks, c, stream);
}

template void rmsnorm_forward<float>(bf16*, float*, const float*, const float*, int64_t, int64_t,
                                     float, cudaStream_t);
template void rmsnorm_forward<bf16>(bf16*, float*, const bf16*, const float*, int64_t, int64_t,
                                    float, cudaStream_t);
template void rmsnorm_backward<float, float, float>(float*, float*, const float*, const float*,
                                                    const float*, const float*, int64_t, int64_t,
                                                    bool, cudaStream_t, bf16*);
template void rmsnorm_backward<bf16, bf16, bf16>(bf16*, float*, const bf16*, const bf16*,
                                                 const float*, const float*, int64_t, int64_t, bool,
                                                 cudaStream_t, bf16*);

}  // namespace moeforge::cuda
