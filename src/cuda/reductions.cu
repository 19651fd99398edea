// Reductions (fixed-order partial sums in double), column sums and elementwise helpers.
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"
#include "cuda/reductions.h"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kElementsPerBlock = int64_t{1} << 16;

// partial[block] = sum over the block's range of f(x[i]) (fixed tree).
template <bool kSquare>
__global__ void partial_sum_kernel(double* partial, const float* x, int64_t count) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kElementsPerBlock;
  const int64_t end = min(count, begin + kElementsPerBlock);
  double sum = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double v = x[i];
    sum += kSquare ? v * v : v;
  }
  __shared__ double warp_partial[kThreads / kWarpSize];
  sum = warp_sum(sum);
  if (threadIdx.x % kWarpSize == 0) warp_partial[threadIdx.x / kWarpSize] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_partial[w];
    partial[blockIdx.x] = total;
  }
}

__global__ void final_sum_kernel(double* out, const double* partial, int64_t num_partials) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kThreads) sum += partial[i];
  __shared__ double warp_partial[kThreads / kWarpSize];
  sum = warp_sum(sum);
  if (threadIdx.x % kWarpSize == 0) warp_partial[threadIdx.x / kWarpSize] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_partial[w];
    *out = total;
  }
}

template <bool kSquare>
void reduce(double* out, const float* x, int64_t count, double* scratch, cudaStream_t stream) {
  const int64_t num_blocks = ceil_div(count, kElementsPerBlock);
  if (num_blocks > 0) {
    partial_sum_kernel<kSquare>
        <<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(scratch, x, count);
    MF_CUDA_CHECK_LAUNCH();
  }
  final_sum_kernel<<<1, kThreads, 0, stream>>>(out, scratch, num_blocks);
  MF_CUDA_CHECK_LAUNCH();
}

constexpr int64_t kRowsPerColumnChunk = 256;

__global__ void column_sum_partial_kernel(float* partial, const bf16* dy, int64_t n, int64_t c) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (j >= c) return;
  const int64_t end = min(n, (chunk + 1) * kRowsPerColumnChunk);
  float sum = 0.0f;
  for (int64_t row = chunk * kRowsPerColumnChunk; row < end; ++row) {
    sum += __bfloat162float(dy[row * c + j]);
  }
  partial[chunk * c + j] = sum;
}

__global__ void chunk_sums_kernel(float* out, const float* partial, int64_t num_chunks, int64_t c) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= c) return;
  float sum = 0.0f;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[chunk * c + j];
  out[j] += sum;
}

__global__ void cast_to_bf16_kernel(bf16* out, const float* x, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(x[i]);
  }
}

// Eight elements per thread: 32-byte reads, 16-byte writes.
__global__ void cast_to_bf16_vec_kernel(bf16* out, const float* x, int64_t num_vecs) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < num_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float f[8];
    load_vec(f, x + v * 8);
    store_vec(out + v * 8, f);
  }
}

__global__ void cast_to_float_kernel(float* out, const bf16* x, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __bfloat162float(x[i]);
  }
}

__global__ void add_bias_kernel(bf16* y, const float* bias, int64_t n, int64_t c) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + bias[i % c]);
  }
}

__global__ void scale_kernel(float* x, float factor, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] *= factor;
  }
}

__global__ void add_kernel(float* y, const float* x, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += x[i];
  }
}

}  // namespace

int64_t reduction_scratch_doubles(int64_t count) {
  const int64_t blocks = ceil_div(count, kElementsPerBlock);
  return blocks > 0 ? blocks : 1;
}

void sum_squares(double* out, const float* x, int64_t count, double* scratch, cudaStream_t stream) {
  reduce<true>(out, x, count, scratch, stream);
}

void sum(double* out, const float* x, int64_t count, double* scratch, cudaStream_t stream) {
  reduce<false>(out, x, count, scratch, stream);
}

void column_sum_accumulate(float* dbias, const bf16* dy, int64_t n, int64_t c,
                           cudaStream_t stream) {
  if (n == 0 || c == 0) return;
  const int64_t num_chunks = ceil_div(n, kRowsPerColumnChunk);
  DeviceBuffer<float> partial(static_cast<size_t>(num_chunks * c));
  const dim3 grid(static_cast<unsigned>(ceil_div(c, kThreads)), static_cast<unsigned>(num_chunks));
  column_sum_partial_kernel<<<grid, kThreads, 0, stream>>>(partial.data(), dy, n, c);
  MF_CUDA_CHECK_LAUNCH();
  accumulate_chunk_sums(dbias, partial.data(), num_chunks, c, stream);
}

void accumulate_chunk_sums(float* out, const float* partial, int64_t num_chunks, int64_t c,
                           cudaStream_t stream) {
  if (c == 0) return;
  chunk_sums_kernel<<<static_cast<unsigned>(ceil_div(c, kThreads)), kThreads, 0, stream>>>(
      out, partial, num_chunks, c);
  MF_CUDA_CHECK_LAUNCH();
}

void cast_to_bf16(bf16* out, const float* x, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  if (count % 8 == 0 && aligned_to(16, out, x)) {
    cast_to_bf16_vec_kernel<<<grid_for(count / 8, kThreads), kThreads, 0, stream>>>(out, x,
                                                                                    count / 8);
  } else {
    cast_to_bf16_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(out, x, count);
  }
  MF_CUDA_CHECK_LAUNCH();
}

void cast_to_float(float* out, const bf16* x, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  cast_to_float_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(out, x, count);
  MF_CUDA_CHECK_LAUNCH();
}

void add_bias(bf16* y, const float* bias, int64_t n, int64_t c, cudaStream_t stream) {
  if (n * c == 0) return;
  add_bias_kernel<<<grid_for(n * c, kThreads), kThreads, 0, stream>>>(y, bias, n, c);
  MF_CUDA_CHECK_LAUNCH();
}

void scale_inplace(float* x, float factor, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  scale_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(x, factor, count);
  MF_CUDA_CHECK_LAUNCH();
}

void add_inplace(float* y, const float* x, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  add_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(y, x, count);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
