// AdamW update and gradient-norm clipping over the flat parameter buffer.
#include "train/adamw.h"

#include <algorithm>
#include <cmath>

namespace moeforge {

AdamW::AdamW(const ParameterLayout& layout, const AdamWHyper& hyper,
             const std::vector<std::string>& no_decay_substrings)
    : layout_(layout),
      hyper_(hyper),
      exp_avg_(static_cast<size_t>(layout.num_params()), 0.0f),
      exp_avg_sq_(static_cast<size_t>(layout.num_params()), 0.0f) {
  decay_ = decay_flags(layout, no_decay_substrings);
}

std::vector<uint8_t> decay_flags(const ParameterLayout& layout,
                                 const std::vector<std::string>& no_decay_substrings) {
  std::vector<uint8_t> flags;
  for (const ParamSpec& spec : layout.specs()) {
    bool decay = true;
    for (const std::string& s : no_decay_substrings) {
      if (spec.name.find(s) != std::string::npos) decay = false;
    }
    flags.push_back(decay ? 1 : 0);
  }
  return flags;
}

AdamWStepConstants::AdamWStepConstants(const AdamWHyper& hyper, double lr, int64_t step_count)
    : b1(static_cast<float>(hyper.beta1)),
      b2(static_cast<float>(hyper.beta2)),
      eps(static_cast<float>(hyper.eps)),
      step_size(
          static_cast<float>(lr / (1.0 - std::pow(hyper.beta1, static_cast<double>(step_count))))),
      bc2_sqrt(static_cast<float>(
          std::sqrt(1.0 - std::pow(hyper.beta2, static_cast<double>(step_count))))),
      decay_factor(static_cast<float>(1.0 - lr * hyper.weight_decay)),
      no_decay_factor(1.0f) {}

void AdamW::step(float* params, const float* grads, double lr) {
  ++step_count_;
  const AdamWStepConstants c(hyper_, lr, step_count_);
  const std::vector<ParamSpec>& specs = layout_.specs();
  for (size_t s = 0; s < specs.size(); ++s) {
    const bool decay = decay_[s] != 0;
    const int64_t begin = specs[s].offset, end = specs[s].offset + specs[s].numel;
#pragma omp parallel for schedule(static)
    for (int64_t i = begin; i < end; ++i) {
      c.update(params[i], exp_avg_[i], exp_avg_sq_[i], grads[i], decay);
    }
  }
}

namespace {

// The sum of grads[i]^2 for i < n in double, in chunks summed in order.
double sum_of_squares(const float* grads, int64_t n) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(num_chunks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < num_chunks; ++c) {
    double sum = 0.0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) sum += static_cast<double>(grads[i]) * grads[i];
    partial[static_cast<size_t>(c)] = sum;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

double global_grad_norm(const float* grads, int64_t n) {
  return std::sqrt(sum_of_squares(grads, n));
}

std::vector<GradSquaresPiece> grad_squares_pieces(const ParameterLayout& layout, int64_t begin,
                                                  int64_t end) {
  std::vector<GradSquaresPiece> out;
  int64_t at = begin;
  const auto add = [&](int64_t until, bool experts) {
    until = std::min(until, end);
    if (until > at) out.push_back({{at, until - at}, experts});
    at = std::max(at, until);
  };
  for (const ParamRange& r : layout.expert_ranges()) {
    add(r.offset, false);
    add(r.offset + r.count, true);
  }
  add(end, false);
  return out;
}

GradSquares grad_squares(const ParameterLayout& layout, const float* values, int64_t begin,
                         int64_t end) {
  GradSquares out;
  for (const GradSquaresPiece& piece : grad_squares_pieces(layout, begin, end)) {
    (piece.experts ? out.experts : out.replicated) +=
        sum_of_squares(values + (piece.range.offset - begin), piece.range.count);
  }
  return out;
}

double model_grad_norm(GradSquares squares, Communicator* expert_group) {
  if (expert_group != nullptr && expert_group->size() > 1) {
    expert_group->all_reduce_sum(&squares.experts, 1);
  }
  return std::sqrt(squares.replicated + squares.experts);
}

double clip_grad_norm(float* grads, int64_t n, double norm, double max_norm) {
  if (max_norm <= 0.0 || norm <= max_norm) return 1.0;
  const double factor = max_norm / (norm + 1e-6);
  const float f = static_cast<float>(factor);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) grads[i] *= f;
  return factor;
}

}  // namespace moeforge
