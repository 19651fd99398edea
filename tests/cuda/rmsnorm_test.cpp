// RMSNorm on the GPU against ops/rmsnorm.h in fp64: forward from the fp32 residual stream and from
// bf16 (q/k norm), backward for both instantiations with assigned and accumulated dinp and an
// accumulating dweight.
#include "cuda/rmsnorm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "gpu_test_util.h"
#include "ops/rmsnorm.h"

namespace moeforge::cuda {
namespace {

using testing::bf16_bound;
using testing::download_double;
using testing::expect_close;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

constexpr float kEps = 1e-5f;

// The values of a T tensor made from x, and the tensor for the device.
template <typename T>
std::vector<float> representable(const std::vector<float>& x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return testing::round_to_bf16(x);
  } else {
    return x;
  }
}

template <typename T>
DeviceBuffer<T> upload_as(const std::vector<float>& x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_device(to_bf16(x));
  } else {
    return to_device(x);
  }
}

// Bound for an output of type T around the reference: fp32 arithmetic noise, plus one bf16 ulp
// when the output is rounded to bf16.
template <typename T>
std::vector<double> output_bound(const std::vector<double>& reference,
                                 const std::vector<double>& noise) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bf16_bound(reference, noise);
  } else {
    return noise;
  }
}

// Rows of standard deviation 2, every fourth of 2e-3 (mean square comparable to eps, so that
// eps matters).
std::vector<float> random_rows(int64_t n, int64_t c, uint64_t seed) {
  std::vector<float> x = testing::random_normal(n * c, seed, 2.0);
  for (int64_t row = 1; row < n; row += 4) {
    for (int64_t j = 0; j < c; ++j) x[row * c + j] *= 1e-3f;
  }
  return x;
}

template <typename In>
void check_forward(int64_t n, int64_t c, uint64_t seed) {
  SCOPED_TRACE("n=" + std::to_string(n) + " c=" + std::to_string(c));
  const std::vector<float> x = representable<In>(random_rows(n, c, seed));
  const std::vector<float> weight = testing::random_uniform(c, seed + 1, 0.5, 1.5);

  std::vector<double> out_ref(n * c), rstd_ref(n);
  const std::vector<double> x_d = to_double(x), weight_d = to_double(weight);
  ops::rmsnorm_forward<double>(out_ref.data(), rstd_ref.data(), x_d.data(), weight_d.data(), n, c,
                               static_cast<double>(kEps));

  DeviceBuffer<In> x_dev = upload_as<In>(x);
  DeviceBuffer<float> weight_dev = to_device(weight);
  DeviceBuffer<bf16> out(n * c);
  DeviceBuffer<float> rstd(n);
  testing::fill_garbage(out);
  testing::fill_garbage(rstd);
  rmsnorm_forward<In>(out.data(), rstd.data(), x_dev.data(), weight_dev.data(), n, c, kEps,
                      nullptr);

  // fp32: the sum of c squares (c roundings), rsqrt (2 ulp) and two products.
  std::vector<double> out_noise(n * c), rstd_noise(n);
  for (int64_t i = 0; i < n * c; ++i) out_noise[i] = (c + 8) * kFloatEps * std::abs(out_ref[i]);
  for (int64_t i = 0; i < n; ++i) rstd_noise[i] = (c + 8) * kFloatEps * rstd_ref[i];
  expect_close("out", download_double(out), out_ref, bf16_bound(out_ref, out_noise));
  expect_close("rstd", download_double(rstd), rstd_ref, rstd_noise);
}

TEST(RmsNormCuda, ForwardFromFloat) {
  MF_REQUIRE_GPU();
  check_forward<float>(37, 96, 1);
  check_forward<float>(1, 100, 2);
  check_forward<float>(300, 2048, 3);
  check_forward<float>(5, 98, 6);  // c % 4 != 0: the one-column-per-lane kernel
}

TEST(RmsNormCuda, ForwardFromBf16) {
  MF_REQUIRE_GPU();
  check_forward<bf16>(600, 128, 4);
  check_forward<bf16>(37, 64, 5);
  check_forward<bf16>(9, 30, 7);
}

// In, DOut and DIn are all T (the two instantiations of the header).
template <typename T>
void check_backward(int64_t n, int64_t c, bool accumulate, uint64_t seed) {
  SCOPED_TRACE("n=" + std::to_string(n) + " c=" + std::to_string(c) +
               " accumulate=" + std::to_string(accumulate));
  const std::vector<float> x = representable<T>(random_rows(n, c, seed));
  const std::vector<float> dout = representable<T>(testing::random_normal(n * c, seed + 1));
  const std::vector<float> weight = testing::random_uniform(c, seed + 2, 0.5, 1.5);
  const std::vector<float> dweight_start = testing::random_normal(c, seed + 3);
  const std::vector<float> dinp_start = representable<T>(testing::random_normal(n * c, seed + 4));
  const std::vector<double> x_d = to_double(x), dout_d = to_double(dout),
                            weight_d = to_double(weight);

  // rstd as saved by a forward, rounded to fp32 once; the reference uses the same values.
  std::vector<float> rstd(n);
  {
    std::vector<double> out_ref(n * c), rstd_ref(n);
    ops::rmsnorm_forward<double>(out_ref.data(), rstd_ref.data(), x_d.data(), weight_d.data(), n, c,
                                 static_cast<double>(kEps));
    for (int64_t i = 0; i < n; ++i) rstd[i] = static_cast<float>(rstd_ref[i]);
  }
  const std::vector<double> rstd_d = to_double(rstd);

  std::vector<double> dinp_ref(n * c);
  std::vector<double> dweight_ref = to_double(dweight_start);
  ops::rmsnorm_backward<double>(dinp_ref.data(), dweight_ref.data(), dout_d.data(), x_d.data(),
                                weight_d.data(), rstd_d.data(), n, c);
  if (accumulate) {
    for (int64_t i = 0; i < n * c; ++i) dinp_ref[i] += dinp_start[i];
  }

  DeviceBuffer<T> x_dev = upload_as<T>(x), dout_dev = upload_as<T>(dout);
  DeviceBuffer<T> dinp = upload_as<T>(dinp_start);
  if (!accumulate) testing::fill_garbage(dinp);
  DeviceBuffer<float> weight_dev = to_device(weight), rstd_dev = to_device(rstd),
                      dweight = to_device(dweight_start);
  // The residual norms' fp32 gradient also comes out in bf16 (NaN-filled first): exactly dinp
  // rounded.
  DeviceBuffer<bf16> dinp_bf16(std::is_same_v<T, float> ? n * c : 0);
  testing::fill_garbage(dinp_bf16);
  rmsnorm_backward<T, T, T>(dinp.data(), dweight.data(), dout_dev.data(), x_dev.data(),
                            weight_dev.data(), rstd_dev.data(), n, c, accumulate, nullptr,
                            std::is_same_v<T, float> ? dinp_bf16.data() : nullptr);
  if constexpr (std::is_same_v<T, float>) {
    std::vector<bf16> rounded = to_bf16(dinp.download());
    testing::expect_equal("dinp bf16", dinp_bf16.download(), rounded);
  }

  // Noise from the magnitudes of the terms: dx_j = r w_j dy_j - r^3 x_j / c * sum_k dy_k w_k x_k.
  std::vector<double> dinp_noise(n * c);
  std::vector<double> dweight_mag(c);
  for (int64_t j = 0; j < c; ++j) dweight_mag[j] = std::abs(dweight_start[j]);
  for (int64_t row = 0; row < n; ++row) {
    const double r = rstd_d[row];
    double dot_mag = 0.0;
    for (int64_t j = 0; j < c; ++j)
      dot_mag += std::abs(dout_d[row * c + j] * weight_d[j] * x_d[row * c + j]);
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = row * c + j;
      double mag =
          r * std::abs(weight_d[j] * dout_d[i]) + r * r * r * std::abs(x_d[i]) * dot_mag / c;
      if (accumulate) mag += std::abs(dinp_start[i]);
      dinp_noise[i] = (c + 8) * kFloatEps * mag;
      dweight_mag[j] += std::abs(dout_d[i] * x_d[i]) * r;
    }
  }
  std::vector<double> dweight_noise(c);
  for (int64_t j = 0; j < c; ++j) dweight_noise[j] = (n + 8) * kFloatEps * dweight_mag[j];

  expect_close("dinp", download_double(dinp), dinp_ref, output_bound<T>(dinp_ref, dinp_noise));
  expect_close("dweight", download_double(dweight), dweight_ref, dweight_noise);
}

TEST(RmsNormCuda, BackwardFloatAssignsOrAccumulatesDinp) {
  MF_REQUIRE_GPU();
  check_backward<float>(37, 96, false, 10);
  check_backward<float>(37, 96, true, 11);
  check_backward<float>(1, 100, false, 12);
  check_backward<float>(600, 2048, true, 13);
  check_backward<float>(5, 98, true, 14);  // c % 4 != 0
}

TEST(RmsNormCuda, BackwardBf16) {
  MF_REQUIRE_GPU();
  check_backward<bf16>(600, 128, false, 20);
  check_backward<bf16>(37, 64, false, 21);
  check_backward<bf16>(9, 30, true, 22);
}

}  // namespace
}  // namespace moeforge::cuda
