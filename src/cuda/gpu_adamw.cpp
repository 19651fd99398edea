// GpuAdamW: decay runs from the parameter names, then one fused kernel launch per run.
#include "cuda/gpu_adamw.h"

#include <cmath>

#include "core/error.h"
#include "cuda/adamw.h"
#include "cuda/cuda_check.h"
#include "cuda/reductions.h"

namespace moeforge::cuda {

GpuAdamW::GpuAdamW(GpuTransformer& model, const AdamWHyper& hyper,
                   const std::vector<std::string>& no_decay_substrings)
    : model_(model), hyper_(hyper) {
  const std::vector<uint8_t> decays = decay_flags(model.layout(), no_decay_substrings);
  const std::vector<ParamSpec>& specs = model.layout().specs();
  for (size_t i = 0; i < specs.size(); ++i) {
    const bool decay = decays[i] != 0;
    if (!runs_.empty() && runs_.back().decay == decay &&
        runs_.back().begin + runs_.back().count == specs[i].offset) {
      runs_.back().count += specs[i].numel;
    } else {
      runs_.push_back(Run{specs[i].offset, specs[i].numel, decay});
    }
  }
  const auto n = static_cast<size_t>(model.num_params());
  exp_avg_.resize(n);
  exp_avg_sq_.resize(n);
  exp_avg_.fill_zero(model.stream());
  exp_avg_sq_.fill_zero(model.stream());
  norm_sq_.resize(1);
  scratch_.resize(static_cast<size_t>(reduction_scratch_doubles(model.num_params())));
}

void GpuAdamW::upload_state(const std::vector<float>& exp_avg,
                            const std::vector<float>& exp_avg_sq) {
  MF_CHECK(exp_avg.size() == exp_avg_.size() && exp_avg_sq.size() == exp_avg_sq_.size(),
           "optimizer state has {} / {} values for a model of {} parameters", exp_avg.size(),
           exp_avg_sq.size(), exp_avg_.size());
  MF_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
  exp_avg_.upload(exp_avg);
  exp_avg_sq_.upload(exp_avg_sq);
}

double GpuAdamW::grad_norm() {
  sum_squares(norm_sq_.data(), model_.grads(), model_.num_params(), scratch_.data(),
              model_.stream());
  double norm_sq = 0.0;
  MF_CUDA_CHECK(cudaMemcpyAsync(&norm_sq, norm_sq_.data(), sizeof(double), cudaMemcpyDeviceToHost,
                                model_.stream()));
  MF_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
  return std::sqrt(norm_sq);
}

GpuAdamWResult GpuAdamW::step(double lr, double max_norm) {
  GpuAdamWResult result;
  result.grad_norm = grad_norm();
  if (!std::isfinite(result.grad_norm)) return result;
  if (max_norm > 0.0 && result.grad_norm > max_norm) {
    result.clip_factor = max_norm / (result.grad_norm + 1e-6);
  }
  ++step_count_;
  const AdamWStepConstants c(hyper_, lr, step_count_);
  AdamWStep step{c.b1,
                 c.b2,
                 c.eps,
                 c.step_size,
                 c.bc2_sqrt,
                 c.no_decay_factor,
                 static_cast<float>(result.clip_factor)};
  for (const Run& run : runs_) {
    step.decay_factor = run.decay ? c.decay_factor : c.no_decay_factor;
    adamw_update(model_.params() + run.begin, model_.params_bf16() + run.begin,
                 exp_avg_.data() + run.begin, exp_avg_sq_.data() + run.begin,
                 model_.grads() + run.begin, run.count, step, model_.stream());
  }
  result.applied = true;
  return result;
}

}  // namespace moeforge::cuda
