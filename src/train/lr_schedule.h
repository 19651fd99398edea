// The learning rate at each optimizer step: linear warmup, then constant, cosine or
// warmup-stable-decay (WSD).
#pragma once

#include <cstdint>

#include "train/train_config.h"

namespace moeforge {

// step is 0-based; min_lr = min_lr_ratio * base_lr; W = warmup_steps, N = max_steps.
// - Warmup (step < W): base_lr * (step + 1) / W, so step W - 1 reaches base_lr.
// - constant: base_lr after warmup.
// - cosine: for W <= step < N, p = (step - W + 1) / (N - W) and
//   lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2, so step N - 1 reaches min_lr.
// - wsd: base_lr until the decay phase, the last D = wsd_decay_steps() steps; there
//   p = (step - (N - D) + 1) / D and lr = min_lr + (base_lr - min_lr) * shape(p) with shape 1 - p,
//   (1 + cos(pi * p)) / 2 or 1 - sqrt(p), so step N - 1 reaches min_lr.
// Steps >= N keep the value of step N - 1. Throws on a negative step.
double learning_rate(const ScheduleConfig& schedule, double base_lr, int64_t step);

}  // namespace moeforge
