// SwiGLU on the GPU against ops/swiglu.h in fp64 on the same bf16 inputs, forward and backward,
// over counts that are not multiples of the 8-wide vector path (the scalar kernels) and that are
// (the vector kernels).
#include "cuda/swiglu.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
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

}  // namespace
}  // namespace moeforge::cuda
