// AdamW with decoupled weight decay (PyTorch semantics: p *= 1 - lr * wd, then the Adam step with
// bias correction) over the flat fp32 parameter buffer, plus global gradient-norm clipping.
// Which parameters decay is decided per tensor by name (ParamSpec) once, at construction.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/parameters.h"

namespace moeforge {

struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// Per ParamSpec of layout: 1 when the tensor decays, 0 when its name contains any of
// no_decay_substrings.
std::vector<uint8_t> decay_flags(const ParameterLayout& layout,
                                 const std::vector<std::string>& no_decay_substrings);

class AdamW {
 public:
  // Tensors whose name contains any of no_decay_substrings get no weight decay.
  AdamW(const ParameterLayout& layout, const AdamWHyper& hyper,
        const std::vector<std::string>& no_decay_substrings);

  // One update with learning rate lr; step_count is incremented first (bias correction uses it).
  void step(float* params, const float* grads, double lr);

  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t n) { step_count_ = n; }
  std::vector<float>& exp_avg() { return exp_avg_; }
  std::vector<float>& exp_avg_sq() { return exp_avg_sq_; }
  bool decays(size_t spec_idx) const { return decay_[spec_idx] != 0; }

 private:
  const ParameterLayout& layout_;
  AdamWHyper hyper_;
  std::vector<uint8_t> decay_;  // per ParamSpec
  std::vector<float> exp_avg_, exp_avg_sq_;
  int64_t step_count_ = 0;
};

// L2 norm of the whole gradient, summed in double in a fixed order (independent of thread count).
double global_grad_norm(const float* grads, int64_t n);

// Scales grads by min(1, max_norm / (norm + 1e-6)) when max_norm > 0; returns the factor applied.
double clip_grad_norm(float* grads, int64_t n, double norm, double max_norm);

}  // namespace moeforge
