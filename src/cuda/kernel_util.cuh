// Device helpers shared by the kernels of src/cuda: warp and block reductions, type conversions and
// the launch-size arithmetic.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace moeforge::cuda {

constexpr int kWarpSize = 32;

// 2^x by the SFU alone (ex2.approx.ftz): the same 2-ulp approximation as exp2f, but results below
// 2^-126 flush to zero instead of costing a range check and two multiplies around every call.
// For softmax weights against a largest weight of 1 the flushed part is far below fp32 rounding.
__device__ __forceinline__ float exp2_flush(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Row r of position p of a lower triangle stored row after row (row r holds r + 1 entries from
// position r (r + 1) / 2): the largest r with r (r + 1) / 2 <= p, exact whatever sqrt's rounding.
__device__ __forceinline__ int64_t triangle_row(int64_t p) {
  auto r = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) / 2.0);
  while (r * (r + 1) / 2 > p) --r;
  while ((r + 1) * (r + 2) / 2 <= p) ++r;
  return r;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ __forceinline__ double warp_max(double x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Block-wide reduction (max or sum) of one value per thread of a kThreads-thread block, the
// result in every thread: warp reductions, then one over the warps' results. shared: kThreads /
// kWarpSize floats of shared memory; it may be reused by the next reduction at once (each
// synchronises the block before writing it).
template <bool kMax, int kThreads>
__device__ __forceinline__ float block_reduce(float x, float* shared) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize,
                "whole warps, at most a warp of them");
  x = kMax ? warp_max(x) : warp_sum(x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < kThreads / kWarpSize ? shared[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(x) : warp_sum(x);
}

__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Vector access: 4 or 8 consecutive elements in one 8- or 16-byte load or store, converted to and
// from fp32. The address must be aligned to the access (aligned_to checks it on the host).
__device__ __forceinline__ void load_vec(float (&f)[4], const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  f[0] = v.x;
  f[1] = v.y;
  f[2] = v.z;
  f[3] = v.w;
}
__device__ __forceinline__ void store_vec(float* p, const float (&f)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
}
__device__ __forceinline__ void load_vec(float (&f)[4], const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  f[0] = a.x;
  f[1] = a.y;
  f[2] = b.x;
  f[3] = b.y;
}
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&f)[4]) {
  uint2 raw;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
  h[0] = __floats2bfloat162_rn(f[0], f[1]);
  h[1] = __floats2bfloat162_rn(f[2], f[3]);
  *reinterpret_cast<uint2*>(p) = raw;
}
__device__ __forceinline__ void load_vec(float (&f)[8], const __nv_bfloat16* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&f)[8]) {
  uint4 raw;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}
__device__ __forceinline__ void load_vec(float (&f)[8], const float* p) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x;
  f[1] = a.y;
  f[2] = a.z;
  f[3] = a.w;
  f[4] = b.x;
  f[5] = b.y;
  f[6] = b.z;
  f[7] = b.w;
}
__device__ __forceinline__ void store_vec(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

// kWidth consecutive elements as fp32: one plain access (kWidth 1) or one vector access (4 or 8),
// so that a kernel can be written once for its scalar and its vector form.
template <int kWidth, typename T>
__device__ __forceinline__ void load_cols(float (&f)[kWidth], const T* p) {
  if constexpr (kWidth == 1) {
    f[0] = to_float(*p);
  } else {
    load_vec(f, p);
  }
}
template <int kWidth, typename T>
__device__ __forceinline__ void store_cols(T* p, const float (&f)[kWidth]) {
  if constexpr (kWidth == 1) {
    *p = from_float<T>(f[0]);
  } else {
    store_vec(p, f);
  }
}

// Whether every pointer is aligned to `bytes` (null pointers count as aligned).
template <typename... Ptrs>
inline bool aligned_to(size_t bytes, const Ptrs*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % bytes == 0) && ...);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Blocks for a grid-stride loop over count elements.
inline unsigned grid_for(int64_t count, int threads) {
  const int64_t blocks = ceil_div(count, threads);
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// grid_for, at most max_blocks blocks (0: no limit).
inline unsigned grid_for(int64_t count, int threads, unsigned max_blocks) {
  const unsigned blocks = grid_for(count, threads);
  return max_blocks == 0 || blocks < max_blocks ? blocks : max_blocks;
}

}  // namespace moeforge::cuda
