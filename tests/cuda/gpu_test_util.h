// Shared helpers of the CUDA tests: skip without a GPU (fail instead when MOEFORGE_EXPECT_GPU=1,
// as on the GPU machine), random inputs, bf16 rounding, device round trips and tolerance checks.
//
// Tolerances follow docs/style.md rule 5. Each check gets a per-element bound; a value passes when
// |actual - reference| <= bound, and NaN or Inf always fails. The bounds the tests build are
//   - bf16 outputs: bf16_ulp(reference), i.e. twice the largest error that rounding the fp64
//     reference itself to bf16 can make, plus the fp32 arithmetic noise of the op;
//   - fp32 outputs: the fp32 rounding noise of the op's arithmetic (n terms summed in fp32 can be
//     off by about n * 2^-24 * sum |term|);
//   - composite kernels (attention): 2 * the error of the same math done in low precision, plus
//     a small floor (expect_within_noise).
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/rng.h"
#include "cuda/bf16.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/device_memory.h"

namespace moeforge::cuda::testing {

inline bool gpu_available() {
  static const bool available = !query_devices().devices.empty();
  return available;
}

// Whether the current device is a Hopper (sm_90) GPU, where the wgmma/TMA kernels run.
inline bool hopper_device() {
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major == 9;
}

inline bool gpu_expected() {
  const char* expect = std::getenv("MOEFORGE_EXPECT_GPU");
  return expect != nullptr && std::string(expect) == "1";
}

// 2^-24: the unit roundoff of fp32.
constexpr double kFloatEps = 0x1.0p-24;

// Normal values with standard deviation `scale`.
inline std::vector<float> random_normal(size_t count, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> x(count);
  for (float& v : x) v = static_cast<float>(scale * rng.normal());
  return x;
}

// Uniform values in [lo, hi).
inline std::vector<float> random_uniform(size_t count, uint64_t seed, double lo, double hi) {
  Rng rng(seed);
  std::vector<float> x(count);
  for (float& v : x) v = static_cast<float>(lo + (hi - lo) * rng.uniform());
  return x;
}

// Uniform integers in [0, n).
inline std::vector<int32_t> random_ints(size_t count, uint64_t seed, int64_t n) {
  Rng rng(seed);
  std::vector<int32_t> x(count);
  for (int32_t& v : x) v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(n)));
  return x;
}

// The values a bf16 tensor made from x holds (round to nearest even).
inline std::vector<float> round_to_bf16(const std::vector<float>& x) {
  return to_float(to_bf16(x));
}

inline std::vector<double> to_double(const std::vector<float>& x) {
  return std::vector<double>(x.begin(), x.end());
}

inline std::vector<double> to_double(const std::vector<bf16>& x) {
  return to_double(to_float(x));
}

inline uint16_t bf16_bits(bf16 x) {
  return static_cast<__nv_bfloat16_raw>(x).x;
}

inline bf16 bf16_from_bits(uint16_t bits) {
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return bf16(raw);
}

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// x rounded to bf16 (nearest, ties to even; through fp32 first), for references that emulate
// bf16 arithmetic. Finite values only.
inline double bf16_round(double x) {
  const uint32_t bits = float_bits(static_cast<float>(x));
  return std::bit_cast<float>((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u);
}

// Spacing of bf16 values (8 significant bits) around x: 2^(floor(log2 |x|) - 7), at least the
// spacing of the smallest normal.
inline double bf16_ulp(double x) {
  const double a = std::max(std::abs(x), 0x1.0p-126);
  return std::ldexp(1.0, std::ilogb(a) - 7);
}

// bound_i = bf16_ulp(reference_i) + noise_i.
inline std::vector<double> bf16_bound(const std::vector<double>& reference,
                                      const std::vector<double>& noise) {
  std::vector<double> bound(reference.size());
  for (size_t i = 0; i < reference.size(); ++i) bound[i] = bf16_ulp(reference[i]) + noise[i];
  return bound;
}

// The device buffer holding a copy of host.
template <typename T>
DeviceBuffer<T> to_device(const std::vector<T>& host) {
  DeviceBuffer<T> buffer;
  buffer.upload(host);
  return buffer;
}

// Fills a device buffer with 0xFF bytes (NaN for float and bf16, -1 for int32): an output that
// must be assigned shows any element the op did not write.
template <typename T>
void fill_garbage(DeviceBuffer<T>& buffer) {
  if (buffer.bytes() > 0) MF_CUDA_CHECK(cudaMemset(buffer.data(), 0xFF, buffer.bytes()));
}

// Waits for the device and reports any kernel error.
inline void synchronize() {
  MF_CUDA_CHECK(cudaGetLastError());
  MF_CUDA_CHECK(cudaDeviceSynchronize());
}

template <typename T>
std::vector<double> download_double(const DeviceBuffer<T>& buffer) {
  synchronize();
  return to_double(buffer.download());
}

// Expects |actual_i - reference_i| <= bound_i for every i and every actual_i finite. On failure
// reports the number of mismatches, the first one, and the max absolute and relative errors.
inline void expect_close(const std::string& what, const std::vector<double>& actual,
                         const std::vector<double>& reference, const std::vector<double>& bound) {
  ASSERT_EQ(actual.size(), reference.size()) << what;
  ASSERT_EQ(bound.size(), reference.size()) << what;
  double max_abs = 0.0, max_rel = 0.0;
  int64_t num_bad = 0, first_bad = -1;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double err = std::abs(actual[i] - reference[i]);
    if (std::isfinite(actual[i])) {
      max_abs = std::max(max_abs, err);
      if (reference[i] != 0.0) max_rel = std::max(max_rel, err / std::abs(reference[i]));
    }
    if (!std::isfinite(actual[i]) || !(err <= bound[i])) {
      if (first_bad < 0) first_bad = static_cast<int64_t>(i);
      ++num_bad;
    }
  }
  if (num_bad == 0) return;
  const size_t i = static_cast<size_t>(first_bad);
  ADD_FAILURE() << what << ": " << num_bad << " of " << actual.size()
                << " elements out of tolerance; first at index " << first_bad << ": got "
                << actual[i] << ", expected " << reference[i] << " (error "
                << std::abs(actual[i] - reference[i]) << ", bound " << bound[i]
                << "); max abs error " << max_abs << ", max rel error " << max_rel;
}

// Same check with one bound for all elements.
inline void expect_close(const std::string& what, const std::vector<double>& actual,
                         const std::vector<double>& reference, double bound) {
  expect_close(what, actual, reference, std::vector<double>(reference.size(), bound));
}

// FlashAttention's rule: max |actual - reference| <= 2 * max |low_precision - reference| + floor,
// where low_precision is the same math done with the kernel's roundings (or coarser ones).
inline void expect_within_noise(const std::string& what, const std::vector<double>& actual,
                                const std::vector<double>& reference,
                                const std::vector<double>& low_precision, double floor) {
  ASSERT_EQ(low_precision.size(), reference.size()) << what;
  double noise = 0.0;
  for (size_t i = 0; i < reference.size(); ++i) {
    noise = std::max(noise, std::abs(low_precision[i] - reference[i]));
  }
  SCOPED_TRACE(what + ": low-precision noise " + std::to_string(noise));
  expect_close(what, actual, reference, 2.0 * noise + floor);
}

// Expects two vectors to be equal element by element (integers, copies, deterministic results),
// reporting the number of differences and the first one.
template <typename T>
void expect_equal(const std::string& what, const std::vector<T>& actual,
                  const std::vector<T>& expected) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  int64_t num_bad = 0, first_bad = -1;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (std::memcmp(&actual[i], &expected[i], sizeof(T)) != 0) {
      if (first_bad < 0) first_bad = static_cast<int64_t>(i);
      ++num_bad;
    }
  }
  if (num_bad == 0) return;
  const size_t i = static_cast<size_t>(first_bad);
  std::ostringstream got, want;
  if constexpr (std::is_same_v<T, bf16>) {
    got << static_cast<double>(to_float({actual[i]})[0]);
    want << static_cast<double>(to_float({expected[i]})[0]);
  } else {
    got << +actual[i];
    want << +expected[i];
  }
  ADD_FAILURE() << what << ": " << num_bad << " of " << actual.size()
                << " elements differ; first at index " << first_bad << ": got " << got.str()
                << ", expected " << want.str();
}

}  // namespace moeforge::cuda::testing

// First statement of every GPU test.
#define MF_REQUIRE_GPU()                                                               \
  do {                                                                                 \
    if (!::moeforge::cuda::testing::gpu_available()) {                                 \
      if (::moeforge::cuda::testing::gpu_expected()) FAIL() << "no CUDA device found"; \
      GTEST_SKIP() << "no CUDA device";                                                \
    }                                                                                  \
  } while (0)
