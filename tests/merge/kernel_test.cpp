// Tests of the pinned per-element merge arithmetic: the fixed summation order, no fused
// multiply-add, rounding from fp64 straight into BF16/F16, and when merging N copies of one value
// gives that value back bit for bit (and when it provably does not).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/rng.h"
#include "merge/merge_kernel.h"

namespace moeforge::merge {
namespace {

// merge_elements over N copies of the same array with SMA weights.
std::vector<std::byte> merge_copies(const std::vector<std::byte>& values, io::DType dtype,
                                    int64_t num_copies, Accumulate accumulate) {
  const int64_t numel = static_cast<int64_t>(values.size() / io::dtype_size(dtype));
  const std::vector<const std::byte*> inputs(static_cast<size_t>(num_copies), values.data());
  const std::vector<double> weights = merge_weights(Method::kSma, num_copies, 0.0, {});
  std::vector<std::byte> out(values.size());
  merge_elements(inputs, dtype, weights, accumulate, dtype, numel, out.data());
  return out;
}

std::vector<std::byte> floats_as_bytes(const std::vector<float>& values) {
  std::vector<std::byte> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

float merge_one(const std::vector<float>& x, const std::vector<double>& weights,
                Accumulate accumulate) {
  std::vector<std::vector<std::byte>> storage;
  std::vector<const std::byte*> inputs;
  for (const float value : x) storage.push_back(floats_as_bytes({value}));
  for (const auto& bytes : storage) inputs.push_back(bytes.data());
  float out = 0.0f;
  merge_elements(inputs, io::DType::kF32, weights, accumulate, io::DType::kF32, 1,
                 reinterpret_cast<std::byte*>(&out));
  return out;
}

// Every 16-bit pattern of a 2-byte dtype except NaNs, as little-endian bytes.
std::vector<std::byte> all_non_nan_16bit(io::DType dtype) {
  std::vector<std::byte> bytes;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t pattern = static_cast<uint16_t>(bits);
    const float value =
        dtype == io::DType::kBF16 ? io::bf16_to_float(pattern) : io::half_to_float(pattern);
    if (std::isnan(value)) continue;
    bytes.push_back(static_cast<std::byte>(pattern & 0xFF));
    bytes.push_back(static_cast<std::byte>(pattern >> 8));
  }
  return bytes;
}

TEST(MergeKernel, SumsInTheFixedOrderOldestFirst) {
  // fl32(fl32(1e8 + 1) - 1e8) = 0: 1 is below half an ulp of 1e8 (8). Any other order gives 1.
  EXPECT_EQ(merge_one({1e8f, 1.0f, -1e8f}, {1.0, 1.0, 1.0}, Accumulate::kFp32), 0.0f);
  EXPECT_EQ(merge_one({1.0f, 1e8f, -1e8f}, {1.0, 1.0, 1.0}, Accumulate::kFp32), 0.0f);
  EXPECT_EQ(merge_one({1e8f, -1e8f, 1.0f}, {1.0, 1.0, 1.0}, Accumulate::kFp32), 1.0f);
  // In fp64 the sum is exact.
  EXPECT_EQ(merge_one({1e8f, 1.0f, -1e8f}, {1.0, 1.0, 1.0}, Accumulate::kFp64), 1.0f);
}

TEST(MergeKernel, RoundsTheProductBeforeTheSum) {
  // w x = (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds (tie to even) to 1 + 2^-11, which cancels the
  // first input exactly; a fused multiply-add would keep 2^-24.
  const float w = 1.0f + 0x1p-12f;
  EXPECT_EQ(merge_one({-(1.0f + 0x1p-11f), w}, {1.0, static_cast<double>(w)}, Accumulate::kFp32),
            0.0f);
}

TEST(MergeKernel, WeightsAreRoundedOnceToFp32) {
  // 3 x fl32(1/3) x 3: the fp32 weight 0x1.555556p-2 is slightly above 1/3.
  const float third = merge_one({3.0f}, {1.0 / 3.0}, Accumulate::kFp32);
  EXPECT_EQ(third, 0x1.555556p-2f * 3.0f);
  EXPECT_EQ(merge_one({3.0f}, {1.0 / 3.0}, Accumulate::kFp64), 1.0f);
}

TEST(MergeKernel, Fp64RoundsStraightToBf16AndHalf) {
  // Just above the midpoint between two BF16 (F16) neighbours: nearest is the upper one, but
  // rounding to fp32 first lands exactly on the midpoint, which then rounds to even (down).
  const double bf16_case = 1.0 + 0x1p-8 + 0x1p-40;
  EXPECT_EQ(io::double_to_bf16(bf16_case), 0x3F81);
  EXPECT_EQ(io::float_to_bf16(static_cast<float>(bf16_case)), 0x3F80);
  EXPECT_EQ(io::double_to_bf16(-bf16_case), 0xBF81);
  const double half_case = 1.0 + 0x1p-11 + 0x1p-40;
  EXPECT_EQ(io::double_to_half(half_case), 0x3C01);
  EXPECT_EQ(io::float_to_half(static_cast<float>(half_case)), 0x3C00);
  // Exact ties go to even; overflow to inf; tiny values keep their sign; NaN stays NaN.
  EXPECT_EQ(io::double_to_bf16(1.0 + 0x1p-8), 0x3F80);
  EXPECT_EQ(io::double_to_bf16(1.0 + 3 * 0x1p-8), 0x3F82);
  EXPECT_EQ(io::double_to_bf16(1e300), 0x7F80);
  EXPECT_EQ(io::double_to_bf16(-1e300), 0xFF80);
  EXPECT_EQ(io::double_to_half(1e10), 0x7C00);
  EXPECT_EQ(io::double_to_half(65519.0), 0x7BFF);
  EXPECT_EQ(io::double_to_half(65520.0), 0x7C00);
  EXPECT_EQ(io::double_to_bf16(-1e-300), 0x8000);
  EXPECT_TRUE(std::isnan(io::bf16_to_float(io::double_to_bf16(std::nan("")))));
  // BF16 subnormals (unit 2^-133): half a unit ties to 0, a hair more rounds up.
  EXPECT_EQ(io::double_to_bf16(0x1p-134), 0x0000);
  EXPECT_EQ(io::double_to_bf16(0x1p-134 + 0x1p-170), 0x0001);
  EXPECT_EQ(io::double_to_bf16(1.5 * 0x1p-133), 0x0002);
}

// Round to nearest even by scaling: the value over its unit in the last place of the target format
// (a power of two, so exact), rounded with rint (ties to even), scaled back.
double nearest_on_grid(double value, int mantissa_bits, int min_exponent) {
  int exponent = 0;
  std::frexp(value, &exponent);  // value = f 2^exponent, 0.5 <= |f| < 1
  const int ulp_exponent = std::max(exponent - 1, min_exponent) - mantissa_bits;
  return std::ldexp(std::nearbyint(std::ldexp(value, -ulp_exponent)), ulp_exponent);
}

TEST(MergeKernel, Fp64RoundingMatchesAnExactReference) {
  Rng rng(7);
  for (int sample = 0; sample < 200000; ++sample) {
    // Random 53-bit significands over the whole BF16 exponent range, subnormals included.
    const double significand = 1.0 + rng.uniform();
    const int exponent = static_cast<int>(rng.below(270)) - 140;
    const double value = std::ldexp(rng.below(2) ? -significand : significand, exponent);
    const double bf16 = nearest_on_grid(value, 7, -126);
    const uint16_t expected_bf16 =
        static_cast<uint16_t>(std::bit_cast<uint32_t>(static_cast<float>(bf16)) >> 16);
    ASSERT_EQ(io::double_to_bf16(value), expected_bf16) << std::hexfloat << value;
    if (std::fabs(value) < 65504.0) {
      const double half = nearest_on_grid(value, 10, -14);
      ASSERT_EQ(io::half_to_float(io::double_to_half(value)), static_cast<float>(half))
          << std::hexfloat << value;
    }
  }
}

// Merging N copies of x with SMA gives x back when:
//  - BF16 and F16 inputs and outputs, fp32 accumulation: for every N tested (1..64) and every
//    non-NaN value (zeros keep their sign, infinities stay). Each product and partial sum is within
//    a relative 2^-24 of its exact value, so the fp32 sum is within about 2N 2^-24 |x| of x, far
//    below half a BF16/F16 unit (2^-9 |x| / 2^-12 |x|), and x is on the output grid.
//  - F32 with fp64 accumulation: for every N tested, by the same argument with 2^-53 vs 2^-25.
//  - F32 with fp32 accumulation: only for N = 1, 2 and 4, and |x| >= 2^-124 (so that x/4 is a
//    normal fp32); found exhaustively over all 2^32 patterns. N = 4 works because x/4 and x/2 are
//    exact and 3x/4 rounds at most to a tie that the last addition rounds back to x. For N = 8 the
//    weight 1/8 is exact too but partial sums like 3x/8, 5x/8 round and the error survives (x =
//    1 + 2^-22 gives 1 + 2^-23); for N = 3 the weight fl32(1/3) != 1/3 already errs.
TEST(MergeKernel, CopiesOfBf16AndHalfValuesMergeToThemselvesForAnyN) {
  for (const io::DType dtype : {io::DType::kBF16, io::DType::kF16}) {
    const std::vector<std::byte> values = all_non_nan_16bit(dtype);
    for (int64_t n = 1; n <= 64; ++n) {
      ASSERT_EQ(merge_copies(values, dtype, n, Accumulate::kFp32), values)
          << io::dtype_name(dtype) << " N=" << n;
    }
  }
}

std::vector<float> f32_samples() {
  Rng rng(11);
  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.0f,
                               1.0f + 0x1p-23f,
                               0x1p-124f,
                               std::numeric_limits<float>::max(),
                               std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 200000; ++i) {
    // Random bit patterns with exponent field >= 3 (|x| >= 2^-124), finite.
    const uint32_t exponent = 3 + static_cast<uint32_t>(rng.below(252));
    const uint32_t bits = (static_cast<uint32_t>(rng.below(2)) << 31) | (exponent << 23) |
                          static_cast<uint32_t>(rng.below(1u << 23));
    values.push_back(std::bit_cast<float>(bits));
  }
  return values;
}

TEST(MergeKernel, CopiesOfF32ValuesMergeToThemselvesForNOneTwoFour) {
  const std::vector<std::byte> values = floats_as_bytes(f32_samples());
  for (const int64_t n : {1, 2, 4}) {
    EXPECT_EQ(merge_copies(values, io::DType::kF32, n, Accumulate::kFp32), values) << "N=" << n;
  }
  for (int64_t n = 1; n <= 64; ++n) {
    ASSERT_EQ(merge_copies(values, io::DType::kF32, n, Accumulate::kFp64), values) << "N=" << n;
  }
}

TEST(MergeKernel, CopiesOfF32ValuesNeedNotMergeToThemselvesOtherwise) {
  const float x = 0x1.000004p+0f;  // 1 + 2^-22
  EXPECT_EQ(merge_one(std::vector<float>(8, x), std::vector<double>(8, 0.125), Accumulate::kFp32),
            0x1.000002p+0f);
  const float y = 0x1.00000ap+0f;
  EXPECT_EQ(
      merge_one(std::vector<float>(3, y), std::vector<double>(3, 1.0 / 3.0), Accumulate::kFp32),
      0x1.00000cp+0f);
  // Below 2^-124, x/4 loses bits as an fp32 subnormal.
  const float tiny = 0x1p-149f;
  EXPECT_EQ(merge_one({tiny, tiny}, {0.5, 0.5}, Accumulate::kFp32), 0.0f);
}

TEST(MergeKernel, MixedDtypesAndLongArrays) {
  // Arrays longer than one block; BF16 in, F32 out: out = fl32(fl32(w1 x1) + fl32(w2 x2)).
  const int64_t numel = 3 * kKernelBlockElements + 5;
  Rng rng(3);
  std::vector<float> a(numel), b(numel);
  for (int64_t j = 0; j < numel; ++j) {
    a[j] = io::bf16_to_float(io::float_to_bf16(static_cast<float>(rng.normal())));
    b[j] = io::bf16_to_float(io::float_to_bf16(static_cast<float>(rng.normal())));
  }
  std::vector<std::byte> a16(numel * 2), b16(numel * 2);
  io::convert_from_float(io::DType::kBF16, a.data(), a16.data(), numel);
  io::convert_from_float(io::DType::kBF16, b.data(), b16.data(), numel);
  const std::vector<const std::byte*> inputs = {a16.data(), b16.data()};
  const std::vector<double> weights = {0.3, 0.7};
  std::vector<float> out(numel);
  merge_elements(inputs, io::DType::kBF16, weights, Accumulate::kFp32, io::DType::kF32, numel,
                 reinterpret_cast<std::byte*>(out.data()));
  const float w1 = 0.3f;
  const float w2 = 0.7f;
  for (int64_t j = 0; j < numel; ++j) {
    const volatile float p1 = w1 * a[j];
    const volatile float p2 = w2 * b[j];
    ASSERT_EQ(out[j], p1 + p2) << "element " << j;
  }
}

}  // namespace
}  // namespace moeforge::merge
