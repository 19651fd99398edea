// RoPE on the GPU: the host angle table against its formula in double (no GPU needed), and
// rope_forward / rope_backward against ops/rope.h in fp64, out of place, in place and over packed
// (strided) rows, where the bytes between the heads must stay untouched.
#include "cuda/rope.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "ops/rope.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::expect_equal;
using testing::to_device;
using testing::to_double;

TEST(RopeTable, MatchesTheFormulaInDouble) {
  for (const int64_t head_dim : {64, 128}) {
    for (const double theta : {10000.0, 500000.0}) {
      SCOPED_TRACE("head_dim=" + std::to_string(head_dim) + " theta=" + std::to_string(theta));
      constexpr int64_t kNumPositions = 4096;
      const int64_t half = head_dim / 2;
      const RopeTable table = make_rope_table(kNumPositions, head_dim, theta);
      ASSERT_EQ(table.cos.size(), static_cast<size_t>(kNumPositions * half));
      ASSERT_EQ(table.sin.size(), static_cast<size_t>(kNumPositions * half));
      std::vector<double> cos_ref(table.cos.size()), sin_ref(table.sin.size());
      for (int64_t pos = 0; pos < kNumPositions; ++pos) {
        for (int64_t i = 0; i < half; ++i) {
          const double angle =
              static_cast<double>(pos) * std::pow(theta, -static_cast<double>(2 * i) / head_dim);
          cos_ref[pos * half + i] = std::cos(angle);
          sin_ref[pos * half + i] = std::sin(angle);
        }
      }
      // Rounded once to fp32: within one fp32 ulp of values in [-1, 1].
      expect_close("cos", to_double(table.cos), cos_ref, 0x1.0p-23);
      expect_close("sin", to_double(table.sin), sin_ref, 0x1.0p-23);
      // Position 0 is the identity; position 1 of pair 0 turns by exactly 1 radian.
      for (int64_t i = 0; i < half; ++i) {
        EXPECT_EQ(table.cos[i], 1.0f);
        EXPECT_EQ(table.sin[i], 0.0f);
      }
      EXPECT_EQ(table.cos[half], static_cast<float>(std::cos(1.0)));
      EXPECT_EQ(table.sin[half], static_cast<float>(std::sin(1.0)));
    }
  }
}

struct RopeCase {
  int64_t n, num_heads, head_dim;
  double theta;
};

// Noise of the fp32 rotation: the fp32 table (half an ulp each), two products and a sum.
std::vector<double> rotation_noise(const std::vector<double>& x, const RopeCase& rc) {
  const int64_t half = rc.head_dim / 2;
  std::vector<double> noise(x.size());
  for (int64_t base = 0; base < static_cast<int64_t>(x.size()); base += rc.head_dim) {
    for (int64_t i = 0; i < half; ++i) {
      const double mag = std::abs(x[base + i]) + std::abs(x[base + i + half]);
      noise[base + i] = noise[base + i + half] = 0x1.0p-21 * mag;
    }
  }
  return noise;
}

void check_rope(const RopeCase& rc, bool backward, uint64_t seed) {
  SCOPED_TRACE("n=" + std::to_string(rc.n) + " num_heads=" + std::to_string(rc.num_heads) +
               " head_dim=" + std::to_string(rc.head_dim) + " theta=" + std::to_string(rc.theta) +
               (backward ? " backward" : " forward"));
  constexpr int64_t kNumPositions = 4096;
  const int64_t count = rc.n * rc.num_heads * rc.head_dim;
  const std::vector<bf16> inp = to_bf16(testing::random_normal(count, seed));
  std::vector<int32_t> positions = testing::random_ints(rc.n, seed + 1, kNumPositions);
  positions[0] = 0;
  positions[rc.n - 1] = kNumPositions - 1;

  const std::vector<double> inp_d = to_double(inp);
  std::vector<double> out_ref(count);
  if (backward) {
    ops::rope_backward<double>(out_ref.data(), inp_d.data(), positions.data(), rc.n, rc.num_heads,
                               rc.head_dim, rc.theta);
  } else {
    ops::rope_forward<double>(out_ref.data(), inp_d.data(), positions.data(), rc.n, rc.num_heads,
                              rc.head_dim, rc.theta);
  }

  const RopeTable table = make_rope_table(kNumPositions, rc.head_dim, rc.theta);
  DeviceBuffer<float> cos_dev = to_device(table.cos), sin_dev = to_device(table.sin);
  DeviceBuffer<int32_t> positions_dev = to_device(positions);
  DeviceBuffer<bf16> inp_dev = to_device(inp);
  DeviceBuffer<bf16> out(count);
  testing::fill_garbage(out);
  DeviceBuffer<bf16> in_place = to_device(inp);
  const auto rope = backward ? rope_backward : rope_forward;
  rope(out.data(), inp_dev.data(), positions_dev.data(), cos_dev.data(), sin_dev.data(), rc.n,
       rc.num_heads, rc.head_dim, nullptr);
  rope(in_place.data(), in_place.data(), positions_dev.data(), cos_dev.data(), sin_dev.data(), rc.n,
       rc.num_heads, rc.head_dim, nullptr);

  expect_close("out", download_double(out), out_ref,
               testing::bf16_bound(out_ref, rotation_noise(inp_d, rc)));
  expect_equal("in place vs out of place", in_place.download(), out.download());

  // Strided: the heads as one part of packed rows (stride with and without the 4-element
  // alignment of the vector kernel), read from and written to packed buffers; the same values.
  const int64_t row = rc.num_heads * rc.head_dim;
  for (const int64_t pad : {int64_t{8}, int64_t{6}}) {
    SCOPED_TRACE("packed rows, pad " + std::to_string(pad));
    const int64_t stride = row + pad;
    std::vector<bf16> packed =
        to_bf16(std::vector<float>(static_cast<size_t>(rc.n * stride), 7.0f));
    for (int64_t t = 0; t < rc.n; ++t) {
      std::copy(inp.begin() + t * row, inp.begin() + (t + 1) * row,
                packed.begin() + t * stride + pad);
    }
    DeviceBuffer<bf16> packed_in = to_device(packed), packed_out = to_device(packed);
    const auto rope_strided = backward ? rope_backward_strided : rope_forward_strided;
    rope_strided(packed_out.data() + pad, stride, packed_in.data() + pad, stride,
                 positions_dev.data(), cos_dev.data(), sin_dev.data(), rc.n, rc.num_heads,
                 rc.head_dim, nullptr);
    std::vector<bf16> want = packed;
    const std::vector<bf16> contiguous = out.download();
    for (int64_t t = 0; t < rc.n; ++t) {
      std::copy(contiguous.begin() + t * row, contiguous.begin() + (t + 1) * row,
                want.begin() + t * stride + pad);
    }
    expect_equal("strided", packed_out.download(), want);
  }
}

const RopeCase kCases[] = {
    {100, 6, 64, 10000.0},  {37, 2, 128, 500000.0}, {1, 8, 64, 10000.0},
    {257, 4, 128, 10000.0}, {50, 3, 36, 10000.0},  // head_dim / 2 % 4 != 0: one pair per thread
    {9, 2, 6, 10000.0},
};

TEST(RopeCuda, ForwardMatchesReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 1;
  for (const RopeCase& rc : kCases) check_rope(rc, false, seed++);
}

TEST(RopeCuda, BackwardMatchesReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const RopeCase& rc : kCases) check_rope(rc, true, seed++);
}

}  // namespace
}  // namespace moeforge::cuda
