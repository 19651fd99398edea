// Host-side bf16 conversions (no GPU needed): round to nearest even on ties, signed zero,
// infinities, NaN and overflow, and agreement with the bit-level definition of the rounding.
#include "cuda/bf16.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::bf16_bits;
using testing::bf16_from_bits;
using testing::float_bits;

uint16_t bits_of(float x) {
  return bf16_bits(to_bf16({x})[0]);
}

// Round to nearest even on the bit pattern: add 0x7FFF plus the lowest kept bit, truncate.
uint16_t reference_rounding(float x) {
  const uint32_t bits = float_bits(x);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(bits_of(1.0f), 0x3F80);
  EXPECT_EQ(bits_of(-2.0f), 0xC000);
  // 1 + 2^-8 lies halfway between 1 (even) and 1 + 2^-7: down to 1.
  EXPECT_EQ(bits_of(1.00390625f), 0x3F80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
  EXPECT_EQ(bits_of(1.01171875f), 0x3F82);
  // 1 + 1.5 * 2^-8 is past the halfway point: up to 1 + 2^-7.
  EXPECT_EQ(bits_of(1.005859375f), 0x3F81);
  // Just above a tie that would round down: up.
  EXPECT_EQ(bits_of(1.00390625f + 0x1.0p-20f), 0x3F81);
  // Just below a tie that would round up: down.
  EXPECT_EQ(bits_of(1.01171875f - 0x1.0p-20f), 0x3F81);
}

TEST(Bf16, KeepsSignedZeroInfinitiesAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(bits_of(0.0f), 0x0000);
  EXPECT_EQ(bits_of(-0.0f), 0x8000);
  EXPECT_EQ(bits_of(inf), 0x7F80);
  EXPECT_EQ(bits_of(-inf), 0xFF80);
  // The largest float rounds past the largest bf16: overflow to infinity, as on the device.
  EXPECT_EQ(bits_of(std::numeric_limits<float>::max()), 0x7F80);
  const bf16 nan = to_bf16({std::numeric_limits<float>::quiet_NaN()})[0];
  EXPECT_EQ(bf16_bits(nan) & 0x7F80, 0x7F80);
  EXPECT_NE(bf16_bits(nan) & 0x007F, 0);
  EXPECT_TRUE(std::isnan(to_float({nan})[0]));
  // A NaN whose payload lies only in the low 16 bits must not turn into infinity.
  const float low_payload_nan = std::bit_cast<float>(0x7F800001u);
  EXPECT_TRUE(std::isnan(to_float(to_bf16({low_payload_nan}))[0]));
}

TEST(Bf16, ToFloatIsExact) {
  const std::vector<uint16_t> patterns = {0x0000, 0x8000, 0x3F80, 0x3F81, 0xC2F7,
                                          0x0001, 0x7F7F, 0xFF80, 0x4049};
  std::vector<bf16> values;
  for (uint16_t p : patterns) values.push_back(bf16_from_bits(p));
  const std::vector<float> floats = to_float(values);
  ASSERT_EQ(floats.size(), patterns.size());
  for (size_t i = 0; i < patterns.size(); ++i) {
    EXPECT_EQ(float_bits(floats[i]), static_cast<uint32_t>(patterns[i]) << 16) << "pattern " << i;
  }
}

TEST(Bf16, MatchesTheBitLevelRoundingOnRandomValues) {
  // Values over many binades, both signs, including exact ties.
  Rng rng(17);
  std::vector<float> x;
  for (int i = 0; i < 20000; ++i) {
    const double mantissa = rng.uniform() * 2.0 - 1.0;
    const int exponent = static_cast<int>(rng.below(80)) - 40;
    x.push_back(static_cast<float>(std::ldexp(mantissa, exponent)));
  }
  for (int i = 0; i < 1000; ++i) {
    const uint32_t kept = static_cast<uint32_t>(rng.below(0x7F00)) << 16;
    x.push_back(std::bit_cast<float>(kept | 0x8000u));
  }
  const std::vector<bf16> rounded = to_bf16(x);
  ASSERT_EQ(rounded.size(), x.size());
  int64_t num_bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (bf16_bits(rounded[i]) != reference_rounding(x[i]) && num_bad++ < 5) {
      ADD_FAILURE() << "to_bf16(" << x[i] << ") gave 0x" << std::hex << bf16_bits(rounded[i])
                    << ", expected 0x" << reference_rounding(x[i]);
    }
  }
  EXPECT_EQ(num_bad, 0);
  EXPECT_TRUE(to_bf16({}).empty());
  EXPECT_TRUE(to_float({}).empty());
}

}  // namespace
}  // namespace moeforge::cuda
