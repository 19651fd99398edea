// Learning-rate schedules: warmup, then constant, cosine or warmup-stable-decay.
#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace moeforge {

namespace {

double decay_shape_value(DecayShape shape, double progress) {
  switch (shape) {
    case DecayShape::kLinear: return 1.0 - progress;
    case DecayShape::kCosine: return 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
    case DecayShape::kSqrt: return 1.0 - std::sqrt(progress);
  }
  MF_FAIL("unknown DecayShape value {}", static_cast<int>(shape));
}

}  // namespace

double learning_rate(const ScheduleConfig& s, double base_lr, int64_t step) {
  MF_CHECK(step >= 0, "learning_rate: step must be >= 0, got {}", step);
  MF_CHECK(s.max_steps > 0, "learning_rate: schedule.max_steps must be > 0, got {}", s.max_steps);
  step = std::min(step, s.max_steps - 1);
  if (step < s.warmup_steps) {
    return base_lr * static_cast<double>(step + 1) / static_cast<double>(s.warmup_steps);
  }
  const double min_lr = s.min_lr_ratio * base_lr;
  switch (s.type) {
    case ScheduleType::kConstant: return base_lr;
    case ScheduleType::kCosine: {
      const double progress = static_cast<double>(step - s.warmup_steps + 1) /
                              static_cast<double>(s.max_steps - s.warmup_steps);
      return min_lr + (base_lr - min_lr) * decay_shape_value(DecayShape::kCosine, progress);
    }
    case ScheduleType::kWsd: {
      const int64_t num_decay_steps = wsd_decay_steps(s);
      const int64_t decay_start = s.max_steps - num_decay_steps;
      if (step < decay_start) return base_lr;
      const double progress =
          static_cast<double>(step - decay_start + 1) / static_cast<double>(num_decay_steps);
      return min_lr + (base_lr - min_lr) * decay_shape_value(s.decay_shape, progress);
    }
  }
  MF_FAIL("unknown ScheduleType value {}", static_cast<int>(s.type));
}

}  // namespace moeforge
