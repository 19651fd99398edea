// Tests of dtype names/sizes and of the bf16/f16 <-> f32 conversions (rounding, NaN, inf,
// subnormals, exhaustive round trips) and the buffer converters.
#include "io/dtype.h"

#include "io/io_test_util.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace moeforge::io {
namespace {

using testing::expect_error;

float from_bits(uint32_t bits) {
  return std::bit_cast<float>(bits);
}

TEST(DType, NamesAndSizesRoundTrip) {
  const std::vector<std::pair<std::string, size_t>> expected = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  for (const auto& [name, size] : expected) {
    const DType dtype = parse_dtype(name);
    EXPECT_EQ(dtype_name(dtype), name);
    EXPECT_EQ(dtype_size(dtype), size) << name;
  }
  EXPECT_EQ(parse_dtype("BF16"), DType::kBF16);
  EXPECT_EQ(parse_dtype("F8_E4M3"), DType::kF8E4M3);
  expect_error([] { parse_dtype("bfloat16"); }, {"unknown dtype 'bfloat16'", "BF16", "F64"});
  EXPECT_FALSE(find_dtype("F17").has_value());
}

TEST(BFloat16, KnownValuesAndRoundToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
  // Exactly halfway: ties go to the even neighbour.
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808000)), 0x3F80);
  EXPECT_EQ(float_to_bf16(from_bits(0x3F818000)), 0x3F82);
  // Just above / below halfway.
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808001)), 0x3F81);
  EXPECT_EQ(float_to_bf16(from_bits(0x3F817FFF)), 0x3F81);
  // Every halfway point and its neighbours over the whole positive and negative range.
  for (uint32_t bits = 0; bits < 0x7F7F; ++bits) {
    for (const uint32_t sign : {0u, 0x8000u}) {
      const uint32_t low = (bits | sign) << 16;
      const uint16_t even = static_cast<uint16_t>((bits & 1u) ? (bits + 1) | sign : bits | sign);
      ASSERT_EQ(float_to_bf16(from_bits(low | 0x8000u)), even) << std::hex << bits;
      ASSERT_EQ(float_to_bf16(from_bits(low | 0x7FFFu)), (bits | sign)) << std::hex << bits;
      ASSERT_EQ(float_to_bf16(from_bits(low | 0x8001u)), (bits + 1) | sign) << std::hex << bits;
    }
  }
}

TEST(BFloat16, InfNanAndSubnormals) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(float_to_bf16(inf), 0x7F80);
  EXPECT_EQ(float_to_bf16(-inf), 0xFF80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to inf
  EXPECT_TRUE(std::isinf(bf16_to_float(0x7F80)));
  // A NaN whose payload lives only in the low 16 bits must not become inf.
  for (const uint32_t nan_bits : {0x7F800001u, 0x7FC00000u, 0xFF800001u, 0x7FFFFFFFu}) {
    const uint16_t bf16 = float_to_bf16(from_bits(nan_bits));
    EXPECT_TRUE(std::isnan(bf16_to_float(bf16))) << std::hex << nan_bits;
    EXPECT_EQ(bf16 & 0x8000u, (nan_bits >> 16) & 0x8000u) << "sign of NaN kept";
  }
  EXPECT_EQ(float_to_bf16(from_bits(0x00000001)), 0x0000);
  EXPECT_EQ(float_to_bf16(from_bits(0x00008000)), 0x0000);  // halfway, 0 is even
  EXPECT_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);  // halfway, 2 is even
  EXPECT_EQ(float_to_bf16(from_bits(0x00010000)), 0x0001);  // exact subnormal
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
}

TEST(BFloat16, AllPatternsRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const float value = bf16_to_float(static_cast<uint16_t>(bits));
    if (std::isnan(value)) {
      ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(value)))) << std::hex << bits;
    } else {
      ASSERT_EQ(float_to_bf16(value), bits) << std::hex << bits;
    }
  }
}

TEST(Half, KnownValues) {
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65519.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);  // halfway to 2^16: ties to even = inf
  EXPECT_EQ(float_to_half(1e10f), 0x7C00);
  EXPECT_EQ(float_to_half(-1e10f), 0xFC00);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);     // smallest normal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);     // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1023.0f, -24)), 0x03FF);  // largest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);     // halfway to 1 unit: 0 is even
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -26)), 0x0000);
  EXPECT_EQ(float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 units: 2 is even
  EXPECT_EQ(float_to_half(std::ldexp(2047.0f, -25)), 0x0400);  // 1023.5 units: carries to normal
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(half_to_float(0x3555), 0.333251953125f);
}

TEST(Half, InfAndNan) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(float_to_half(inf), 0x7C00);
  EXPECT_EQ(float_to_half(-inf), 0xFC00);
  EXPECT_EQ(half_to_float(0x7C00), inf);
  EXPECT_EQ(half_to_float(0xFC00), -inf);
  for (const uint32_t nan_bits : {0x7F800001u, 0x7FC00000u, 0xFF800001u, 0x7FFFFFFFu}) {
    const uint16_t half = float_to_half(from_bits(nan_bits));
    EXPECT_TRUE(std::isnan(half_to_float(half))) << std::hex << nan_bits;
    EXPECT_EQ(half & 0x8000u, (nan_bits >> 16) & 0x8000u) << "sign of NaN kept";
  }
  EXPECT_TRUE(std::isnan(half_to_float(0x7C01)));
  EXPECT_TRUE(std::isnan(half_to_float(0xFE00)));
}

TEST(Half, RoundToNearestEvenAtEveryHalfway) {
  // Between each pair of neighbouring finite halves (subnormals included): the midpoint goes to
  // the even one, one float ulp either side to the nearer one. Midpoints are exact in float.
  for (uint32_t bits = 0; bits < 0x7BFF; ++bits) {
    for (const uint32_t sign : {0u, 0x8000u}) {
      const uint16_t low = static_cast<uint16_t>(bits | sign);
      const uint16_t high = static_cast<uint16_t>((bits + 1) | sign);
      const float midpoint = static_cast<float>(
          (static_cast<double>(half_to_float(low)) + static_cast<double>(half_to_float(high))) / 2);
      const float towards_zero = std::nextafter(midpoint, 0.0f);
      const float away = std::nextafter(midpoint, sign ? -1e6f : 1e6f);
      ASSERT_EQ(float_to_half(midpoint), (bits & 1u) ? high : low) << std::hex << bits;
      ASSERT_EQ(float_to_half(towards_zero), low) << std::hex << bits;
      ASSERT_EQ(float_to_half(away), high) << std::hex << bits;
    }
  }
}

TEST(Half, AllPatternsRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const float value = half_to_float(static_cast<uint16_t>(bits));
    if (std::isnan(value)) {
      ASSERT_TRUE(std::isnan(half_to_float(float_to_half(value)))) << std::hex << bits;
    } else {
      ASSERT_EQ(float_to_half(value), bits) << std::hex << bits;
    }
  }
}

// Converts through unaligned buffers (offset by one byte) in both directions.
TEST(Convert, FloatingDtypesBothDirectionsUnaligned) {
  const std::vector<float> values = {1.0f, -2.5f, 0.15625f, 3.0e4f, -0.0f};
  for (const DType dtype : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64}) {
    std::vector<std::byte> storage(1 + values.size() * dtype_size(dtype));
    std::byte* unaligned = storage.data() + 1;
    convert_from_float(dtype, values.data(), unaligned, values.size());
    std::vector<float> back(values.size());
    convert_to_float(dtype, unaligned, back.data(), values.size());
    std::vector<double> back_double(values.size());
    convert_to_double(dtype, unaligned, back_double.data(), values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      // Every value above is exact in bf16 and f16 except 3.0e4 in bf16 (8-bit significand).
      const float expected =
          dtype == DType::kBF16 ? bf16_to_float(float_to_bf16(values[i])) : values[i];
      EXPECT_EQ(std::bit_cast<uint32_t>(back[i]), std::bit_cast<uint32_t>(expected))
          << dtype_name(dtype) << " " << i;
      EXPECT_EQ(back_double[i], static_cast<double>(expected)) << dtype_name(dtype) << " " << i;
    }
  }
  // The stored encodings themselves.
  std::vector<std::byte> bf16(2);
  convert_from_float(DType::kBF16, values.data(), bf16.data(), 1);
  uint16_t bits = 0;
  std::memcpy(&bits, bf16.data(), 2);
  EXPECT_EQ(bits, 0x3F80);
  std::vector<std::byte> f64(8);
  const double precise = 0.1;
  convert_from_double(DType::kF64, &precise, f64.data(), 1);
  double stored = 0;
  std::memcpy(&stored, f64.data(), 8);
  EXPECT_EQ(stored, 0.1);
  EXPECT_NE(bf16_to_float(float_to_bf16(3.0e4f)), 3.0e4f);
}

TEST(Convert, RejectsNonFloatingDtypes) {
  std::vector<std::byte> buffer(16);
  float out[2] = {};
  expect_error([&] { convert_to_float(DType::kI32, buffer.data(), out, 2); }, {"I32"});
  expect_error([&] { convert_from_float(DType::kF8E4M3, out, buffer.data(), 2); }, {"F8_E4M3"});
  double out_double[2] = {};
  expect_error([&] { convert_to_double(DType::kU8, buffer.data(), out_double, 2); }, {"U8"});
}

TEST(ConvertFromDouble, RoundsOnceIntoBf16AndHalf) {
  // Halfway in fp32 after rounding once, just above halfway in fp64: rounding through fp32 would
  // round down to even; one rounding from fp64 rounds up.
  const double values[] = {1.0 + 0x1p-8 + 0x1p-40, -(1.0 + 0x1p-8 + 0x1p-40),
                           1.0 + 0x1p-11 + 0x1p-40};
  std::vector<std::byte> bf16(2 * 3), half(2 * 3);
  convert_from_double(DType::kBF16, values, bf16.data(), 3);
  convert_from_double(DType::kF16, values, half.data(), 3);
  uint16_t bits[3];
  std::memcpy(bits, bf16.data(), sizeof(bits));
  EXPECT_EQ(bits[0], 0x3F81);
  EXPECT_EQ(bits[1], 0xBF81);
  EXPECT_EQ(float_to_bf16(static_cast<float>(values[0])), 0x3F80);  // what two roundings give
  std::memcpy(bits, half.data(), sizeof(bits));
  EXPECT_EQ(bits[2], 0x3C01);
  EXPECT_EQ(double_to_bf16(std::numeric_limits<double>::infinity()), 0x7F80);
  EXPECT_TRUE(std::isnan(bf16_to_float(double_to_bf16(std::nan("")))));
}

}  // namespace
}  // namespace moeforge::io
