// Tests of the learning-rate schedules: hand-computed values at the phase boundaries, monotonic
// phases and no jumps where one phase hands over to the next.
#include "train/lr_schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "core/error.h"

namespace moeforge {
namespace {

ScheduleConfig make_schedule(ScheduleType type, int64_t warmup_steps, int64_t max_steps) {
  ScheduleConfig s;
  s.type = type;
  s.warmup_steps = warmup_steps;
  s.max_steps = max_steps;
  return s;
}

TEST(LrScheduleTest, WarmupIsLinearAndReachesBaseOnItsLastStep) {
  const ScheduleConfig s = make_schedule(ScheduleType::kConstant, 4, 10);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 0), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 1), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 2), 1.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 3), 2.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 4), 2.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 9), 2.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 2.0, 1000), 2.0);
  EXPECT_DOUBLE_EQ(learning_rate(make_schedule(ScheduleType::kConstant, 0, 10), 2.0, 0), 2.0);
}

TEST(LrScheduleTest, CosineByHand) {
  ScheduleConfig s = make_schedule(ScheduleType::kCosine, 0, 4);
  s.min_lr_ratio = 0.1;
  // p = (step + 1) / 4; lr = 0.1 + 0.9 * (1 + cos(pi p)) / 2.
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 0), 0.1 + 0.45 * (1 + std::cos(std::numbers::pi / 4)));
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 1), 0.55);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 2), 0.1 + 0.45 * (1 + std::cos(3 * std::numbers::pi / 4)));
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 3), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 50), 0.1);

  s.warmup_steps = 2;  // decay over steps 2, 3: p = 1/2, 1
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 0), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 1), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 2), 0.55);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 3), 0.1);

  s.warmup_steps = 4;  // warmup takes every step
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 3), 1.0);
}

TEST(LrScheduleTest, WsdByHandForEachShape) {
  ScheduleConfig s = make_schedule(ScheduleType::kWsd, 2, 10);
  s.min_lr_ratio = 0.1;
  s.decay_steps = 4;  // decay over steps 6..9: p = 1/4, 2/4, 3/4, 1
  s.decay_shape = DecayShape::kLinear;
  const double expected_linear[] = {0.5, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1};
  for (int64_t step = 0; step < 10; ++step) {
    EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, step), expected_linear[step]) << step;
  }
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 10), 0.1);

  s.decay_shape = DecayShape::kSqrt;
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 5), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 6), 0.1 + 0.9 * 0.5);  // 1 - sqrt(1/4)
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 7), 0.1 + 0.9 * (1 - std::sqrt(0.5)));
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 9), 0.1);

  s.decay_shape = DecayShape::kCosine;
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 7), 0.55);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 9), 0.1);

  s.decay_steps.reset();
  s.decay_fraction = 0.5;  // 5 decay steps: stable through step 4
  s.decay_shape = DecayShape::kLinear;
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 4), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 5), 0.1 + 0.9 * 0.8);
}

TEST(LrScheduleTest, WsdDefaultDecayIsTheLastFifth) {
  ScheduleConfig s = make_schedule(ScheduleType::kWsd, 0, 100);
  EXPECT_EQ(wsd_decay_steps(s), 20);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 79), 1.0);
  EXPECT_LT(learning_rate(s, 1.0, 80), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, 1.0, 99), 0.1);
}

// Warmup rises, the stable phase is flat, every decay falls, and consecutive steps never jump by
// more than one step's share of the phase (the sqrt shape's first step drops by 1/sqrt(D)).
TEST(LrScheduleTest, PhasesAreMonotonicAndContinuous) {
  const double base = 3e-3;
  const double min_lr_ratio = 0.1;
  const int64_t warmup = 100;
  const int64_t num_decay = 400;
  struct Case {
    ScheduleType type;
    DecayShape shape;
    double max_decay_jump;  // in units of (base - min)
  };
  const Case cases[] = {
      {ScheduleType::kCosine, DecayShape::kLinear, std::numbers::pi / 2 / 900},
      {ScheduleType::kWsd, DecayShape::kLinear, 1.0 / num_decay},
      {ScheduleType::kWsd, DecayShape::kCosine, std::numbers::pi / 2 / num_decay},
      {ScheduleType::kWsd, DecayShape::kSqrt, 1.0 / std::sqrt(double(num_decay))},
  };
  for (const Case& c : cases) {
    ScheduleConfig s = make_schedule(c.type, warmup, 1000);
    s.min_lr_ratio = min_lr_ratio;
    s.decay_shape = c.shape;
    if (c.type == ScheduleType::kWsd) s.decay_steps = num_decay;
    const int64_t decay_start = c.type == ScheduleType::kWsd ? 1000 - num_decay : warmup;
    double previous = 0.0;
    for (int64_t step = 0; step < 1000; ++step) {
      const double lr = learning_rate(s, base, step);
      const double jump = std::abs(lr - previous);
      if (step < warmup) {
        EXPECT_GT(lr, previous) << step;
        EXPECT_NEAR(jump, base / warmup, 1e-15) << step;
      } else if (step < decay_start) {
        EXPECT_DOUBLE_EQ(lr, base) << step;
      } else {
        EXPECT_LT(lr, previous) << step;
        EXPECT_LE(jump, c.max_decay_jump * base * (1 - min_lr_ratio) * (1 + 1e-12)) << step;
      }
      if (step >= warmup) {
        EXPECT_GE(lr, base * min_lr_ratio * (1 - 1e-12)) << step;
      }
      previous = lr;
    }
    EXPECT_DOUBLE_EQ(previous, base * min_lr_ratio);
  }
}

TEST(LrScheduleTest, RejectsNegativeSteps) {
  EXPECT_THROW(learning_rate(make_schedule(ScheduleType::kCosine, 0, 10), 1.0, -1), Error);
}

}  // namespace
}  // namespace moeforge
