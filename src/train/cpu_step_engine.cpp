// The CPU step engines: the reference Transformer and AdamW on the host, as the trainer used them
// directly before there were other devices, and the same with ZeRO-1's sharded AdamW.
#include <cmath>

#include "core/error.h"
#include "train/step_engine.h"

namespace moeforge {

std::string first_nonfinite_gradient(const ParameterLayout& layout, const float* grads) {
  const std::vector<ParamSpec>& specs = layout.specs();
  for (auto it = specs.rbegin(); it != specs.rend(); ++it) {
    for (int64_t i = 0; i < it->numel; ++i) {
      if (!std::isfinite(grads[it->offset + i])) return it->name;
    }
  }
  return "none";
}

namespace {

// What both CPU engines share: the host model is the engine's model, so there is nothing to copy.
class CpuModelEngine : public StepEngine {
 public:
  explicit CpuModelEngine(Transformer<float>& model) : model_(model) {}

  void load_from_host() override {}
  void store_to_host() override {}
  void zero_grads() override { model_.zero_grads(); }
  void sum_expert_group_grads(Communicator& group) override {
    all_reduce_gradient_ranges(model_.grads().data(), model_.layout().replicated_ranges(), group,
                               GradReduceDtype::kFloat32);
  }

  void all_reduce_grad_ranges(Communicator& comm, GradReduceDtype dtype,
                              const std::vector<ParamRange>& ranges) override {
    all_reduce_gradient_ranges(model_.grads().data(), ranges, comm, dtype);
  }

  LossBreakdown forward_backward(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                 int64_t seq, double dloss, double ce_count,
                                 std::vector<MoeFfnStats>& stats) override {
    const LossBreakdown loss = model_.forward(tokens, targets, batch, seq);
    stats.insert(stats.end(), model_.moe_stats().begin(), model_.moe_stats().end());
    model_.backward(dloss, ce_count);
    return loss;
  }

  ForwardFn forward_fn() override {
    return [this](const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
      return model_.forward(tokens, targets, batch, seq);
    };
  }

 protected:
  Transformer<float>& model_;
};

class CpuStepEngine final : public CpuModelEngine {
 public:
  CpuStepEngine(Transformer<float>& model, AdamW& optimizer)
      : CpuModelEngine(model), optimizer_(optimizer) {}

  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    all_reduce_gradients(model_.grads().data(), model_.grads().size(), comm, dtype);
  }

  StepUpdate update(double lr, double max_norm, bool loss_finite) override {
    const ParameterLayout& layout = model_.layout();
    const int64_t n = layout.num_params();
    StepUpdate result;
    result.grad_norm = model_grad_norm(grad_squares(layout, model_.grads().data(), 0, n),
                                       layout.experts_sharded() ? &model_.expert_group() : nullptr);
    if (!loss_finite || !std::isfinite(result.grad_norm)) return result;
    clip_grad_norm(model_.grads().data(), n, result.grad_norm, max_norm);
    optimizer_.step(model_.params().data(), model_.grads().data(), lr);
    result.applied = true;
    return result;
  }

  std::string first_nonfinite_gradient() override {
    return moeforge::first_nonfinite_gradient(model_.layout(), model_.grads().data());
  }

 private:
  AdamW& optimizer_;
};

class CpuZero1StepEngine final : public CpuModelEngine {
 public:
  CpuZero1StepEngine(Transformer<float>& model, ZeroAdamW& optimizer)
      : CpuModelEngine(model), optimizer_(optimizer) {}

  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    MF_CHECK(&comm == &optimizer_.comm(),
             "with ZeRO-1 the gradients are reduce-scattered over the data-parallel group that "
             "shards the optimizer state, not over another communicator");
    optimizer_.reduce_gradients(model_.grads().data(), dtype);
  }

  StepUpdate update(double lr, double max_norm, bool loss_finite) override {
    StepUpdate result;
    result.grad_norm = optimizer_.grad_norm();
    if (!loss_finite || !std::isfinite(result.grad_norm)) return result;
    optimizer_.clip(result.grad_norm, max_norm);
    optimizer_.step(model_.params().data(), lr);
    result.applied = true;
    return result;
  }

  std::string first_nonfinite_gradient() override {
    const int64_t spec_idx = optimizer_.first_nonfinite_spec();
    return spec_idx < 0 ? "none" : model_.layout().specs()[static_cast<size_t>(spec_idx)].name;
  }

 private:
  ZeroAdamW& optimizer_;
};

}  // namespace

std::unique_ptr<StepEngine> make_cpu_zero1_step_engine(Transformer<float>& model,
                                                       ZeroAdamW& optimizer) {
  return std::make_unique<CpuZero1StepEngine>(model, optimizer);
}

std::unique_ptr<StepEngine> make_cpu_step_engine(Transformer<float>& model, AdamW& optimizer) {
  return std::make_unique<CpuStepEngine>(model, optimizer);
}

}  // namespace moeforge
