// AdamW with decoupled weight decay (PyTorch semantics: p *= 1 - lr * wd, then the Adam step with
// bias correction) over the flat fp32 parameter buffer, plus global gradient-norm clipping.
// Which parameters decay is decided per tensor by name (ParamSpec) once, at construction.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
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

// The float constants of update number step_count with learning rate lr, and the element update
// that AdamW and the ZeRO-1 optimizer share (so both compute bit-identical results).
struct AdamWStepConstants {
  float b1, b2, eps, step_size, bc2_sqrt, decay_factor, no_decay_factor;

  AdamWStepConstants(const AdamWHyper& hyper, double lr, int64_t step_count);
  // m, v and p of one element with gradient g (decay: whether the tensor decays).
  void update(float& p, float& m, float& v, float g, bool decay) const {
    m = b1 * m + (1.0f - b1) * g;
    v = b2 * v + (1.0f - b2) * g * g;
    const float denom = std::sqrt(v) / bc2_sqrt + eps;
    p = p * (decay ? decay_factor : no_decay_factor) - step_size * m / denom;
  }
};

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

// Squares of gradient elements summed in double, split into the part that a model whose experts
// are sharded replicates over its expert group and the part in its expert ranges (all of it
// replicated when the experts are not sharded).
struct GradSquares {
  double replicated = 0.0;
  double experts = 0.0;
};

// [begin, end) of a flat buffer of layout cut at the boundaries of its expert ranges, in offset
// order, each piece with whether it lies in an expert range (one replicated piece when the
// experts are not sharded).
struct GradSquaresPiece {
  ParamRange range;
  bool experts = false;
};
std::vector<GradSquaresPiece> grad_squares_pieces(const ParameterLayout& layout, int64_t begin,
                                                  int64_t end);

// The squares of elements [begin, end) of a flat gradient buffer of layout (values[i] is element
// begin + i), summed as global_grad_norm sums, piece by piece (grad_squares_pieces) in order.
GradSquares grad_squares(const ParameterLayout& layout, const float* values, int64_t begin,
                         int64_t end);

// The whole model's gradient norm: sqrt(replicated + experts summed over expert_group), where
// expert_group holds the other shards of the experts (null, or one rank: nothing to sum).
double model_grad_norm(GradSquares squares, Communicator* expert_group);

// Scales grads by min(1, max_norm / (norm + 1e-6)) when max_norm > 0; returns the factor applied.
double clip_grad_norm(float* grads, int64_t n, double norm, double max_norm);

}  // namespace moeforge
