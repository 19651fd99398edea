// GpuStepEngine: the trainer's StepEngine over GpuTransformer and GpuAdamW.
#include "cuda/gpu_step_engine.h"

#include <cmath>

#include "comm/local_rank.h"
#include "cuda/device_info.h"
#include "cuda/gpu_adamw.h"

namespace moeforge::cuda {
namespace {

class GpuStepEngine final : public StepEngine {
 public:
  GpuStepEngine(Transformer<float>& model, AdamW& optimizer, const AdamWHyper& hyper,
                const std::vector<std::string>& no_decay, Recompute recompute)
      : host_model_(model),
        host_optimizer_(optimizer),
        gpu_(model.config(), recompute),
        optimizer_(gpu_, hyper, no_decay) {}

  void load_from_host() override {
    gpu_.upload_params(host_model_.params());
    optimizer_.upload_state(host_optimizer_.exp_avg(), host_optimizer_.exp_avg_sq());
    optimizer_.set_step_count(host_optimizer_.step_count());
  }

  void store_to_host() override {
    host_model_.params() = gpu_.download_params();
    host_optimizer_.exp_avg() = optimizer_.download_exp_avg();
    host_optimizer_.exp_avg_sq() = optimizer_.download_exp_avg_sq();
    host_optimizer_.set_step_count(optimizer_.step_count());
  }

  void zero_grads() override { gpu_.zero_grads(); }

  LossBreakdown forward_backward(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                 int64_t seq, double dloss,
                                 std::vector<MoeFfnStats>& stats) override {
    const LossBreakdown loss = gpu_.forward_backward(tokens, targets, batch, seq, dloss);
    stats.insert(stats.end(), gpu_.moe_stats().begin(), gpu_.moe_stats().end());
    return loss;
  }

  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    if (comm.size() == 1) return;
    std::vector<float> grads = gpu_.download_grads();
    all_reduce_gradients(grads.data(), grads.size(), comm, dtype);
    gpu_.upload_grads(grads);
  }

  StepUpdate update(double lr, double max_norm, bool loss_finite) override {
    StepUpdate result;
    if (!loss_finite) {
      result.grad_norm = optimizer_.grad_norm();
      return result;
    }
    const GpuAdamWResult r = optimizer_.step(lr, max_norm);
    result.grad_norm = r.grad_norm;
    result.applied = r.applied;
    return result;
  }

  std::string first_nonfinite_gradient() override {
    const std::vector<float> grads = gpu_.download_grads();
    return moeforge::first_nonfinite_gradient(gpu_.layout(), grads.data());
  }

  ForwardFn forward_fn() override {
    return [this](const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
      return gpu_.forward_backward(tokens, targets, batch, seq, 0.0);
    };
  }

 private:
  Transformer<float>& host_model_;
  AdamW& host_optimizer_;
  GpuTransformer gpu_;
  GpuAdamW optimizer_;
};

}  // namespace

std::unique_ptr<StepEngine> make_gpu_step_engine(Transformer<float>& model, AdamW& optimizer,
                                                 const AdamWHyper& hyper,
                                                 const std::vector<std::string>& no_decay,
                                                 Recompute recompute) {
  // Under mpirun every rank of a host gets its own GPU (by local rank) before any allocation.
  bind_device_to_local_rank(local_rank_from_environment());
  return std::make_unique<GpuStepEngine>(model, optimizer, hyper, no_decay, recompute);
}

}  // namespace moeforge::cuda
