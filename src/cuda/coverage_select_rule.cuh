// The arithmetic of the coverage select's rule (cuda/coverage_select.h) that its kernels share: an
// entry's fp32 bits (its order), its 2^-52 fixed-point value, a segment's limit, and the digits in
// which the cut's bits are found.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moeforge::cuda::coverage {

constexpr int kDigitBits = 8;
constexpr int kBuckets = 1 << kDigitBits;
constexpr int kPasses = 32 / kDigitBits;
constexpr double kFixedOne = 4503599627370496.0;  // 2^52

// The fp32 bits without the sign: they order the values >= 0 as the values, -0.0 as +0.0.
template <typename T>
__device__ __forceinline__ uint32_t key_of(T value) {
  return __float_as_uint(static_cast<float>(value)) & 0x7fffffffu;
}

__device__ __forceinline__ unsigned long long fixed_of(uint32_t key) {
  return __double2ull_rn(static_cast<double>(__uint_as_float(key)) * kFixedOne);
}

__device__ __forceinline__ unsigned long long limit_of(unsigned long long total, double gamma) {
  if (gamma >= 1.0) return total;
  return min(total, static_cast<unsigned long long>(gamma * static_cast<double>(total)));
}

// The shift of pass `pass`'s digit: bits [shift, shift + kDigitBits) of the key.
__host__ __device__ constexpr int digit_shift(int pass) {
  return 32 - kDigitBits * (pass + 1);
}

// Whether key shares the bits found before pass `pass` with the cut's bits found so far.
__device__ __forceinline__ bool in_cut_prefix(uint32_t key, uint32_t cut_key, int pass) {
  const int shift = digit_shift(pass) + kDigitBits;
  return pass == 0 || (key >> shift) == (cut_key >> shift);
}

}  // namespace moeforge::cuda::coverage
