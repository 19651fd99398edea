// Counter-based random fill (see random_fill.h): splitmix64 of seed + index, 24 bits to [0, 1).
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/random_fill.h"

namespace moeforge::cuda {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The fp32 value of element i; bf16 output is its round to nearest even.
template <typename T>
__global__ void fill_uniform_kernel(T* x, int64_t count, uint64_t seed, float half_width) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(splitmix64(seed * 0x100000001B3ull + i) >> 40) * 0x1.0p-24f;
    x[i] = from_float<T>((2.0f * u - 1.0f) * half_width);
  }
}

__global__ void fill_constant_kernel(float* x, int64_t count, float value) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

constexpr int kThreads = 256;

template <typename T>
void fill_uniform(T* x, int64_t count, uint64_t seed, float scale, cudaStream_t stream) {
  if (count == 0) return;
  fill_uniform_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(x, count, seed,
                                                                          1.7320508f * scale);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void fill_uniform_bf16(bf16* x, int64_t count, uint64_t seed, float scale, cudaStream_t stream) {
  fill_uniform(x, count, seed, scale, stream);
}

void fill_uniform_f32(float* x, int64_t count, uint64_t seed, float scale, cudaStream_t stream) {
  fill_uniform(x, count, seed, scale, stream);
}

void fill_constant_f32(float* x, int64_t count, float value, cudaStream_t stream) {
  if (count == 0) return;
  fill_constant_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(x, count, value);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
