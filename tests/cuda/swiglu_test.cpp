// SwiGLU on the GPU against ops/swiglu.h in fp64 on the same bf16 inputs, forward and backward,
// over counts that are not multiples of the 8-wide vector path (the scalar kernels) and that are
// (the vector kernels); and the calls bounded by a device count of used rows against the unbounded
// ones, bit for bit.
#include "cuda/swiglu.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "gpu_test_util.h"
#include "ops/swiglu.h"

namespace moeforge::cuda {
namespace {

using testing::bf16_bound;
using testing::download_double;
using testing::expect_close;
using testing::to_device;
using testing::to_double;

// fp32 math with a possibly approximate exp: relative error of silu up to ~2^-20 (|gate| <= 10),
// cancellation in 1 + g (1 - s) of the backward up to 2^-24 (1 + |g|).
constexpr double kNoise = 0x1.0p-18;

// Gates over [-10, 10] (sigmoid saturating on both sides), up and dout normal.
std::vector<bf16> random_gates(int64_t count, uint64_t seed) {
  std::vector<float> gate = testing::random_normal(count, seed, 3.0);
  for (float& g : gate) g = std::max(-10.0f, std::min(10.0f, g));
  return to_bf16(gate);
}

void check_forward(int64_t count, uint64_t seed) {
  SCOPED_TRACE("count=" + std::to_string(count));
  const std::vector<bf16> gate = random_gates(count, seed);
  const std::vector<bf16> up = to_bf16(testing::random_normal(count, seed + 1));
  const std::vector<double> gate_d = to_double(gate), up_d = to_double(up);
  std::vector<double> out_ref(count);
  ops::swiglu_forward<double>(out_ref.data(), gate_d.data(), up_d.data(), count);

  DeviceBuffer<bf16> gate_dev = to_device(gate), up_dev = to_device(up), out(count);
  testing::fill_garbage(out);
  swiglu_forward(out.data(), gate_dev.data(), up_dev.data(), count, nullptr);

  std::vector<double> noise(count);
  for (int64_t i = 0; i < count; ++i) noise[i] = kNoise * std::abs(gate_d[i] * up_d[i]);
  expect_close("out", download_double(out), out_ref, bf16_bound(out_ref, noise));
}

void check_backward(int64_t count, uint64_t seed) {
  SCOPED_TRACE("count=" + std::to_string(count));
  const std::vector<bf16> gate = random_gates(count, seed);
  const std::vector<bf16> up = to_bf16(testing::random_normal(count, seed + 1));
  const std::vector<bf16> dout = to_bf16(testing::random_normal(count, seed + 2));
  const std::vector<double> gate_d = to_double(gate), up_d = to_double(up),
                            dout_d = to_double(dout);
  std::vector<double> dgate_ref(count), dup_ref(count);
  ops::swiglu_backward<double>(dgate_ref.data(), dup_ref.data(), dout_d.data(), gate_d.data(),
                               up_d.data(), count);

  DeviceBuffer<bf16> gate_dev = to_device(gate), up_dev = to_device(up), dout_dev = to_device(dout);
  DeviceBuffer<bf16> dgate(count), dup(count);
  testing::fill_garbage(dgate);
  testing::fill_garbage(dup);
  swiglu_backward(dgate.data(), dup.data(), dout_dev.data(), gate_dev.data(), up_dev.data(), count,
                  nullptr);

  std::vector<double> dgate_noise(count), dup_noise(count);
  for (int64_t i = 0; i < count; ++i) {
    dgate_noise[i] = kNoise * std::abs(dout_d[i] * up_d[i]) * (1.0 + std::abs(gate_d[i]));
    dup_noise[i] = kNoise * std::abs(dout_d[i] * gate_d[i]);
  }
  expect_close("dgate", download_double(dgate), dgate_ref, bf16_bound(dgate_ref, dgate_noise));
  expect_close("dup", download_double(dup), dup_ref, bf16_bound(dup_ref, dup_noise));

  // In place (dgate is dout, as the training step runs it): the same values exactly.
  DeviceBuffer<bf16> in_place = to_device(dout), dup_in_place(count);
  swiglu_backward(in_place.data(), dup_in_place.data(), in_place.data(), gate_dev.data(),
                  up_dev.data(), count, nullptr);
  testing::expect_equal("dgate in place", in_place.download(), dgate.download());
  testing::expect_equal("dup in place", dup_in_place.download(), dup.download());
}

// The used rows of a bounded call: the unbounded call's values on the first used * width
// elements, `rest` after them.
std::vector<bf16> used_then(const std::vector<bf16>& unbounded, const std::vector<bf16>& rest,
                            int64_t used_elements) {
  std::vector<bf16> out = rest;
  std::copy(unbounded.begin(), unbounded.begin() + used_elements, out.begin());
  return out;
}

// With used_rows on the device, for used 0, 1, about half, all but one and all of num_rows: the
// bounded forward and backward (and the backward in place) equal the unbounded calls bit for bit
// on the rows [0, used), and the elements past them keep what they held (the 0xFF fill of the
// outputs; dout's values in place).
void check_used_rows(int64_t num_rows, int64_t width, uint64_t seed) {
  SCOPED_TRACE("num_rows=" + std::to_string(num_rows) + " width=" + std::to_string(width));
  const int64_t count = num_rows * width;
  DeviceBuffer<bf16> gate = to_device(random_gates(count, seed));
  DeviceBuffer<bf16> up = to_device(to_bf16(testing::random_normal(count, seed + 1)));
  const std::vector<bf16> dout = to_bf16(testing::random_normal(count, seed + 2));
  DeviceBuffer<bf16> dout_dev = to_device(dout);
  DeviceBuffer<bf16> out_all(count), dgate_all(count), dup_all(count);
  swiglu_forward(out_all.data(), gate.data(), up.data(), count, nullptr);
  swiglu_backward(dgate_all.data(), dup_all.data(), dout_dev.data(), gate.data(), up.data(), count,
                  nullptr);
  const std::vector<bf16> out_ref = out_all.download(), dgate_ref = dgate_all.download(),
                          dup_ref = dup_all.download();
  const std::vector<bf16> sentinel(count, testing::bf16_from_bits(0xFFFF));

  for (const int64_t used : {int64_t{0}, int64_t{1}, num_rows / 2, num_rows - 1, num_rows}) {
    SCOPED_TRACE("used=" + std::to_string(used));
    DeviceBuffer<int32_t> used_rows = to_device(std::vector<int32_t>{static_cast<int32_t>(used)});
    DeviceBuffer<bf16> out(count), dgate(count), dup(count), dup_in_place(count);
    testing::fill_garbage(out);
    testing::fill_garbage(dgate);
    testing::fill_garbage(dup);
    testing::fill_garbage(dup_in_place);
    DeviceBuffer<bf16> in_place = to_device(dout);
    swiglu_forward(out.data(), gate.data(), up.data(), used_rows.data(), num_rows, width, nullptr);
    swiglu_backward(dgate.data(), dup.data(), dout_dev.data(), gate.data(), up.data(),
                    used_rows.data(), num_rows, width, nullptr);
    swiglu_backward(in_place.data(), dup_in_place.data(), in_place.data(), gate.data(), up.data(),
                    used_rows.data(), num_rows, width, nullptr);
    testing::synchronize();
    const int64_t used_elements = used * width;
    testing::expect_equal("out", out.download(), used_then(out_ref, sentinel, used_elements));
    testing::expect_equal("dgate", dgate.download(), used_then(dgate_ref, sentinel, used_elements));
    testing::expect_equal("dup", dup.download(), used_then(dup_ref, sentinel, used_elements));
    testing::expect_equal("dgate in place", in_place.download(),
                          used_then(dgate_ref, dout, used_elements));
    testing::expect_equal("dup in place", dup_in_place.download(),
                          used_then(dup_ref, sentinel, used_elements));
  }
}

TEST(SwigluCuda, ForwardMatchesReference) {
  MF_REQUIRE_GPU();
  for (const int64_t count : {1, 7, 37 * 172, 100003, 64, 8 * 12345})
    check_forward(count, 1 + count);
}

TEST(SwigluCuda, BackwardMatchesReference) {
  MF_REQUIRE_GPU();
  for (const int64_t count : {1, 7, 37 * 172, 100003, 64, 8 * 12345})
    check_backward(count, 2 + count);
}

// Row widths: 24 (the vector kernels, three vectors a row: a bound counted in elements or vectors
// instead of rows shows, as a width of 1 or 8 would hide), 12 (with an even row count the count is
// a multiple of 8 but a row can end mid-vector: the bounded call must take the scalar kernels) and
// 7 (scalar); with 4099 rows the bound falls inside one of many blocks.
TEST(SwigluCuda, UsedRowsBoundTheTouchedElements) {
  MF_REQUIRE_GPU();
  const std::pair<int64_t, int64_t> shapes[] = {{1, 24}, {37, 24}, {4099, 24}, {38, 12}, {37, 7}};
  uint64_t seed = 3;
  for (const auto& [num_rows, width] : shapes) check_used_rows(num_rows, width, seed += 3);
}

}  // namespace
}  // namespace moeforge::cuda
