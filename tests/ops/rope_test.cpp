// Tests of ops::rope_forward / rope_backward against a complex rotation, plus its invariants.
#include "ops/rope.h"

#include <gtest/gtest.h>

#include <cmath>
#include <complex>
#include <limits>
#include <vector>

#include "core/error.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::numerical_gradient;
using testing::random_vector;

constexpr int64_t kHeads = 3;
constexpr int64_t kHeadDim = 10;
constexpr int64_t kHalf = kHeadDim / 2;
constexpr double kTheta = 10000.0;
const std::vector<int32_t> kPositions = {0, 3, 7, 1, 250};
const int64_t kN = static_cast<int64_t>(kPositions.size());
const int64_t kSize = kN * kHeads * kHeadDim;

// Pair (x[i], x[i + d/2]) as the complex number x[i] + i x[i + d/2], times exp(i * angle).
std::vector<double> complex_rotation(const std::vector<double>& inp) {
  std::vector<double> out(inp.size());
  for (int64_t t = 0; t < kN; ++t) {
    for (int64_t h = 0; h < kHeads; ++h) {
      const int64_t base = (t * kHeads + h) * kHeadDim;
      for (int64_t i = 0; i < kHalf; ++i) {
        const double freq = std::pow(kTheta, -2.0 * i / kHeadDim);
        const std::complex<double> z(inp[base + i], inp[base + i + kHalf]);
        const std::complex<double> rotated = z * std::polar(1.0, kPositions[t] * freq);
        out[base + i] = rotated.real();
        out[base + i + kHalf] = rotated.imag();
      }
    }
  }
  return out;
}

template <typename T>
void check_forward(double atol) {
  const auto inp = random_vector(kSize, 1);
  const std::vector<T> inp_t(inp.begin(), inp.end());
  std::vector<T> out(kSize, std::numeric_limits<T>::quiet_NaN());
  rope_forward<T>(out.data(), inp_t.data(), kPositions.data(), kN, kHeads, kHeadDim, kTheta);
  expect_close(std::vector<double>(out.begin(), out.end()), complex_rotation(inp), atol, 0.0,
               "out");
}

TEST(Rope, ForwardMatchesComplexRotation) {
  check_forward<double>(1e-13);
  check_forward<float>(1e-6);
}

TEST(Rope, ForwardInPlaceMatchesOutOfPlace) {
  const auto inp = random_vector(kSize, 2);
  std::vector<double> out(kSize);
  rope_forward<double>(out.data(), inp.data(), kPositions.data(), kN, kHeads, kHeadDim, kTheta);
  std::vector<double> in_place = inp;
  rope_forward<double>(in_place.data(), in_place.data(), kPositions.data(), kN, kHeads, kHeadDim,
                       kTheta);
  expect_close(in_place, out, 0.0, 0.0, "in_place");
}

TEST(Rope, PositionZeroIsIdentity) {
  const auto inp = random_vector(kHeads * kHeadDim, 3);
  const int32_t position = 0;
  std::vector<double> out(inp.size());
  rope_forward<double>(out.data(), inp.data(), &position, 1, kHeads, kHeadDim, kTheta);
  expect_close(out, inp, 0.0, 0.0, "out");
}

TEST(Rope, RotationPreservesPairNorms) {
  const auto inp = random_vector(kSize, 4);
  std::vector<double> out(kSize);
  rope_forward<double>(out.data(), inp.data(), kPositions.data(), kN, kHeads, kHeadDim, kTheta);
  for (int64_t row = 0; row < kN * kHeads; ++row) {
    for (int64_t i = 0; i < kHalf; ++i) {
      const int64_t a = row * kHeadDim + i;
      const int64_t b = a + kHalf;
      EXPECT_NEAR(std::hypot(out[a], out[b]), std::hypot(inp[a], inp[b]), 1e-14)
          << "row " << row << " pair " << i;
    }
  }
}

TEST(Rope, BackwardIsTheInverseRotation) {
  const auto inp = random_vector(kSize, 5);
  std::vector<double> rotated(kSize);
  rope_forward<double>(rotated.data(), inp.data(), kPositions.data(), kN, kHeads, kHeadDim, kTheta);
  std::vector<double> back(kSize, 1e30);
  rope_backward<double>(back.data(), rotated.data(), kPositions.data(), kN, kHeads, kHeadDim,
                        kTheta);
  expect_close(back, inp, 1e-14, 0.0, "back");
  rope_backward<double>(rotated.data(), rotated.data(), kPositions.data(), kN, kHeads, kHeadDim,
                        kTheta);
  expect_close(rotated, inp, 1e-14, 0.0, "back_in_place");
}

TEST(Rope, GradientMatchesFiniteDifferences) {
  auto inp = random_vector(kSize, 6);
  const auto r = random_vector(kSize, 7);
  std::vector<double> out(kSize);
  auto loss = [&]() {
    rope_forward<double>(out.data(), inp.data(), kPositions.data(), kN, kHeads, kHeadDim, kTheta);
    double sum = 0.0;
    for (int64_t i = 0; i < kSize; ++i) sum += out[i] * r[i];
    return sum;
  };
  std::vector<double> dinp(kSize, 1e30);
  rope_backward<double>(dinp.data(), r.data(), kPositions.data(), kN, kHeads, kHeadDim, kTheta);
  expect_close(dinp, numerical_gradient(inp, loss), 1e-7, 1e-6, "dinp");
}

TEST(Rope, InvalidArgumentsThrow) {
  std::vector<double> buf(kHeads * 9);
  const int32_t position = 1;
  EXPECT_THROW(rope_forward<double>(buf.data(), buf.data(), &position, 1, kHeads, 9, kTheta),
               Error);
  EXPECT_THROW(rope_backward<double>(buf.data(), buf.data(), &position, 1, kHeads, 9, kTheta),
               Error);
  EXPECT_THROW(rope_forward<double>(buf.data(), buf.data(), &position, 1, kHeads, 8, 0.0), Error);
}

}  // namespace
}  // namespace moeforge::ops
