// Fused AdamW on the GPU against the arithmetic of train/adamw.cpp (replicated here in float, in
// the same order, with the clipping factor applied to the gradient first), within a few fp32
// ulps of the terms (the device may fuse multiply-adds); params_bf16 must be the
// round-to-nearest-even of the new fp32 parameters.
#include "cuda/adamw.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/gpu_adamw.h"
#include "gpu_test_util.h"
#include "train/adamw.h"

namespace moeforge::cuda {
namespace {

using testing::expect_close;
using testing::expect_equal;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

// The optimiser state of `count` parameters.
struct State {
  std::vector<float> params, exp_avg, exp_avg_sq, grads;
};

// Realistic state: a zero gradient and zero moments in every 7th element (v = 0 implies m = 0).
State random_state(int64_t count, uint64_t seed) {
  State s;
  s.params = testing::random_normal(count, seed, 0.02);
  s.exp_avg = testing::random_normal(count, seed + 1, 1e-3);
  s.exp_avg_sq = testing::random_normal(count, seed + 2, 1e-3);
  s.grads = testing::random_normal(count, seed + 3, 1e-2);
  for (int64_t i = 0; i < count; ++i) {
    s.exp_avg_sq[i] *= s.exp_avg_sq[i];
    if (i % 7 == 3) s.exp_avg[i] = s.exp_avg_sq[i] = s.grads[i] = 0.0f;
  }
  return s;
}

// The step of train/adamw.cpp at step t with learning rate lr.
AdamWStep make_step(double lr, double weight_decay, int64_t t, float grad_scale) {
  const double beta1 = 0.9, beta2 = 0.95;
  AdamWStep step{};
  step.beta1 = static_cast<float>(beta1);
  step.beta2 = static_cast<float>(beta2);
  step.eps = 1e-8f;
  step.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(t))));
  step.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(t))));
  step.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  step.no_decay_factor = 1.0f;
  step.grad_scale = grad_scale;
  return step;
}

// Expected values of the update in float, and per-element bounds for fused multiply-adds.
struct Expected {
  std::vector<double> params, exp_avg, exp_avg_sq;
  std::vector<double> params_bound, exp_avg_bound, exp_avg_sq_bound;
};

Expected expected_update(const State& s, const AdamWStep& step, bool decay) {
  const float decay_factor = decay ? step.decay_factor : step.no_decay_factor;
  const size_t count = s.params.size();
  Expected e;
  for (auto* v : {&e.params, &e.exp_avg, &e.exp_avg_sq, &e.params_bound, &e.exp_avg_bound,
                  &e.exp_avg_sq_bound}) {
    v->resize(count);
  }
  const float b1 = step.beta1, b2 = step.beta2;
  const double u = kFloatEps;
  for (size_t i = 0; i < count; ++i) {
    // train/adamw.cpp, after clip_grad_norm scaled the gradient.
    const float g = s.grads[i] * step.grad_scale;
    const float m = b1 * s.exp_avg[i] + (1.0f - b1) * g;
    const float v = b2 * s.exp_avg_sq[i] + (1.0f - b2) * g * g;
    const float denom = std::sqrt(v) / step.bc2_sqrt + step.eps;
    const float p = s.params[i] * decay_factor - step.step_size * m / denom;
    e.exp_avg[i] = m;
    e.exp_avg_sq[i] = v;
    e.params[i] = p;

    // A few roundings of the magnitudes of the terms, propagated through the division.
    const double err_m = 4 * u * (b1 * std::abs(s.exp_avg[i]) + (1.0 - b1) * std::abs(g));
    const double err_v = 6 * u * (b2 * s.exp_avg_sq[i] + (1.0 - b2) * double(g) * g);
    const double sqrt_v = std::sqrt(double(v));
    const double err_denom =
        (v > 0 ? sqrt_v * (err_v / (2.0 * v) + 2 * u) / step.bc2_sqrt : 0.0) + u * denom;
    const double update = step.step_size * std::abs(m) / denom;
    const double err_update =
        step.step_size * (err_m + std::abs(m) * err_denom / denom) / denom + 2 * u * update;
    e.exp_avg_bound[i] = err_m;
    e.exp_avg_sq_bound[i] = err_v;
    e.params_bound[i] =
        4 * u * (std::abs(double(s.params[i]) * decay_factor) + update) + err_update;
  }
  return e;
}

// Updates elements [offset, offset + count) of buffers of offset + count + 7 elements (an offset
// that is not a multiple of 4 starts the range off the 16-byte boundary of the vector path) and
// checks them, and that the elements around the range stay as they were.
void check_update(int64_t count, const AdamWStep& step, bool with_bf16, uint64_t seed,
                  int64_t offset = 0, bool decay = true) {
  SCOPED_TRACE("count=" + std::to_string(count) + " offset=" + std::to_string(offset) +
               " decay_factor=" + std::to_string(step.decay_factor) +
               " grad_scale=" + std::to_string(step.grad_scale) +
               (with_bf16 ? " with bf16 copy" : "") + (decay ? "" : " (no decay)"));
  const int64_t total = offset + count + 7;
  const State s = random_state(total, seed);
  const Expected e = expected_update(s, step, decay);
  DeviceBuffer<AdamWStep> step_dev = to_device(std::vector<AdamWStep>{step});

  DeviceBuffer<float> params = to_device(s.params), exp_avg = to_device(s.exp_avg),
                      exp_avg_sq = to_device(s.exp_avg_sq), grads = to_device(s.grads);
  DeviceBuffer<bf16> params_bf16(total);
  testing::fill_garbage(params_bf16);
  adamw_update(params.data() + offset, with_bf16 ? params_bf16.data() + offset : nullptr,
               exp_avg.data() + offset, exp_avg_sq.data() + offset, grads.data() + offset, count,
               step_dev.data(), decay, nullptr);
  testing::synchronize();

  // In the range: the update; outside: the inputs unchanged.
  const auto select = [&](const std::vector<double>& updated, const std::vector<float>& input) {
    std::vector<double> out = to_double(input);
    for (int64_t i = offset; i < offset + count; ++i) out[i] = updated[i];
    return out;
  };
  const auto bound = [&](const std::vector<double>& in_range) {
    std::vector<double> out(in_range.size(), 0.0);
    for (int64_t i = offset; i < offset + count; ++i) out[i] = in_range[i];
    return out;
  };
  const std::vector<float> new_params = params.download();
  expect_close("params", to_double(new_params), select(e.params, s.params), bound(e.params_bound));
  expect_close("exp_avg", to_double(exp_avg.download()), select(e.exp_avg, s.exp_avg),
               bound(e.exp_avg_bound));
  expect_close("exp_avg_sq", to_double(exp_avg_sq.download()), select(e.exp_avg_sq, s.exp_avg_sq),
               bound(e.exp_avg_sq_bound));
  expect_equal("grads are read only", grads.download(), s.grads);
  if (with_bf16) {
    const std::vector<bf16> copy = params_bf16.download();
    const std::vector<bf16> want = to_bf16(new_params);
    for (int64_t i = 0; i < total; ++i) {
      const bool in_range = i >= offset && i < offset + count;
      // Outside the range the copy keeps its garbage (NaN bits).
      ASSERT_EQ(testing::bf16_bits(copy[i]), in_range ? testing::bf16_bits(want[i]) : 0xFFFF)
          << "params_bf16[" << i << "]";
    }
  }
}

TEST(AdamWCuda, DecayingStepWithClippedGradient) {
  MF_REQUIRE_GPU();
  const AdamWStep step = make_step(3e-4, 0.1, 3, 0.37f);
  check_update(1000003, step, true, 1);
  check_update(5, step, true, 2);
  check_update(1, step, false, 3);
}

TEST(AdamWCuda, FirstStepWithoutDecayOrClipping) {
  MF_REQUIRE_GPU();
  const AdamWStep step = make_step(1e-3, 0.0, 1, 1.0f);
  check_update(4099, step, true, 4);
  check_update(4099, step, false, 5);
}

// Ranges of the flat buffer that start anywhere (GpuAdamW updates one range per decay setting):
// a scalar head up to the 16-byte boundary, the four-wide body, a scalar tail.
TEST(AdamWCuda, RangesStartingOffTheVectorBoundary) {
  MF_REQUIRE_GPU();
  const AdamWStep step = make_step(1e-3, 0.1, 2, 0.8f);
  for (const int64_t offset : {1, 2, 3, 4, 5}) {
    check_update(1027, step, true, 10 + offset, offset);
    check_update(3, step, true, 20 + offset, offset);
  }
  check_update(1027, step, false, 30, 3);
}

// Tensors without decay take the step's no_decay_factor (GpuAdamW's runs of norms and biases).
TEST(AdamWCuda, NoDecayRunsUseTheNoDecayFactor) {
  MF_REQUIRE_GPU();
  AdamWStep step = make_step(1e-3, 0.1, 4, 0.9f);
  step.no_decay_factor = 0.75f;  // far from decay_factor, so that a mix-up shows
  check_update(1027, step, true, 40, 1, false);
  check_update(1027, step, true, 41, 0, true);
}

// skip (a non-finite norm) leaves the parameters, the moments and the bf16 copy untouched.
TEST(AdamWCuda, SkippedStepChangesNothing) {
  MF_REQUIRE_GPU();
  AdamWStep step = make_step(1e-3, 0.1, 2, 1.0f);
  step.skip = 1;
  const int64_t count = 1031;
  const State s = random_state(count, 50);
  DeviceBuffer<float> params = to_device(s.params), exp_avg = to_device(s.exp_avg),
                      exp_avg_sq = to_device(s.exp_avg_sq), grads = to_device(s.grads);
  DeviceBuffer<bf16> params_bf16(count);
  testing::fill_garbage(params_bf16);
  const std::vector<bf16> garbage = params_bf16.download();
  DeviceBuffer<AdamWStep> step_dev = to_device(std::vector<AdamWStep>{step});
  adamw_update(params.data(), params_bf16.data(), exp_avg.data(), exp_avg_sq.data(), grads.data(),
               count, step_dev.data(), true, nullptr);
  testing::synchronize();
  expect_equal("params", params.download(), s.params);
  expect_equal("exp_avg", exp_avg.download(), s.exp_avg);
  expect_equal("exp_avg_sq", exp_avg_sq.download(), s.exp_avg_sq);
  const std::vector<bf16> copy = params_bf16.download();
  for (int64_t i = 0; i < count; ++i) {
    ASSERT_EQ(testing::bf16_bits(copy[i]), testing::bf16_bits(garbage[i])) << i;
  }
}

// The norm, clipping factor and skip decided on the device equal model_grad_norm's and
// clipping_for's on the host, bit for bit: the replicated and the expert slots summed apart, in
// order.
TEST(AdamWCuda, FinishGradClippingMatchesTheHostRule) {
  MF_REQUIRE_GPU();
  const std::vector<double> slots = {0.3, 1e-9, 2.75, 0.125, 7.0 / 3.0, 1e-17, 0.5};
  const std::vector<uint8_t> expert = {0, 1, 0, 1, 1, 0, 0};
  struct Case {
    std::vector<double> slots;
    double max_norm;
  };
  std::vector<double> with_inf = slots;
  with_inf[3] = INFINITY;
  std::vector<double> with_nan = slots;
  with_nan[5] = NAN;
  // The norm is about 2.451: max_norms 2.0 and 2.45 clip it (it is below twice either), 2.46 not.
  for (const Case& c :
       {Case{slots, 1.0}, Case{slots, 2.0}, Case{slots, 2.45}, Case{slots, 2.46},
        Case{slots, 100.0}, Case{slots, 0.0}, Case{with_inf, 1.0}, Case{with_nan, 1.0}}) {
    GradSquares squares;
    for (size_t i = 0; i < c.slots.size(); ++i) {
      (expert[i] ? squares.experts : squares.replicated) += c.slots[i];
    }
    const double want_norm = model_grad_norm(squares, nullptr);
    const bool finite = std::isfinite(want_norm);
    const double want_factor = clipping_for(want_norm, c.max_norm).clip_factor;
    SCOPED_TRACE("max_norm " + std::to_string(c.max_norm) + " norm " + std::to_string(want_norm));
    DeviceBuffer<double> slots_dev = to_device(c.slots), norm(1);
    DeviceBuffer<uint8_t> expert_dev = to_device(expert);
    AdamWStep start = make_step(1e-3, 0.1, 2, 0.5f);
    DeviceBuffer<AdamWStep> step = to_device(std::vector<AdamWStep>{start});
    finish_grad_clipping(norm.data(), step.data(), slots_dev.data(), expert_dev.data(),
                         static_cast<int64_t>(c.slots.size()), c.max_norm, nullptr);
    testing::synchronize();
    const double got_norm = norm.download()[0];
    const AdamWStep got = step.download()[0];
    if (finite) {
      EXPECT_EQ(got_norm, want_norm);
    } else {
      EXPECT_FALSE(std::isfinite(got_norm));
    }
    EXPECT_EQ(got.grad_scale, static_cast<float>(want_factor));
    EXPECT_EQ(got.skip, finite ? 0 : 1);
    EXPECT_EQ(got.step_size, start.step_size) << "the rest of the step is left as it was";
  }
}

}  // namespace
}  // namespace moeforge::cuda
