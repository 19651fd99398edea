// GpuStepEngine: the trainer's StepEngine over GpuTransformer and GpuAdamW.
#include "cuda/gpu_step_engine.h"

#include <fmt/format.h>

#include <cmath>
#include <string>

#include "comm/local_rank.h"
#include "core/error.h"
#include "cuda/bucketed_grad_reducer.h"
#include "cuda/device_communicator.h"
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
        optimizer_(gpu_, hyper, no_decay) {
    Communicator& group = model.expert_group();
    if (group.size() > 1) {
      MF_CHECK(model.parallel_layout() == ParallelLayout::kSequenceExpert &&
                   model.ep_dispatch() != EpDispatch::kAllToAll,
               "on GPUs, parallel.expert_parallel > 1 runs layout \"sp_ep\" with the all-gather "
               "dispatch (set parallel.ep_dispatch to \"allgather\" or \"auto\")");
      std::string why_not;
      ep_comm_ = make_device_communicator(group, gpu_.stream(), &why_not);
      MF_CHECK(ep_comm_ != nullptr,
               "parallel.expert_parallel {} on GPUs exchanges activations through NCCL, but {}",
               group.size(), why_not);
      gpu_.set_expert_parallel_group(*ep_comm_);
    }
  }

  void load_from_host() override {
    optimizer_.synchronize();
    gpu_.upload_params(host_model_.params());
    optimizer_.upload_state(host_optimizer_.exp_avg(), host_optimizer_.exp_avg_sq());
    optimizer_.set_step_count(host_optimizer_.step_count());
  }

  void store_to_host() override {
    optimizer_.synchronize();
    host_model_.params() = gpu_.download_params();
    host_optimizer_.exp_avg() = optimizer_.download_exp_avg();
    host_optimizer_.exp_avg_sq() = optimizer_.download_exp_avg_sq();
    host_optimizer_.set_step_count(optimizer_.step_count());
  }

  // Lazy: the next backward assigns the gradients instead of adding to zeros (no 4-byte-per-
  // parameter memset, and the weight-gradient GEMMs skip reading their output).
  void zero_grads() override { grads_pending_zero_ = true; }

  LossBreakdown forward_backward(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                 int64_t seq, double dloss, double ce_count,
                                 std::vector<MoeFfnStats>& stats) override {
    const GradMode mode =
        grads_pending_zero_ && dloss != 0.0 ? GradMode::kAssign : GradMode::kAccumulate;
    const LossBreakdown loss =
        gpu_.forward_backward(tokens, targets, batch, seq, dloss, mode, ce_count);
    if (dloss != 0.0) grads_pending_zero_ = false;
    stats.insert(stats.end(), gpu_.moe_stats().begin(), gpu_.moe_stats().end());
    return loss;
  }

  // On the GPUs, the sums of the last micro-batch's gradients start on the reducer's stream as
  // its backward finishes them (buckets of bucket_bytes), beside the backward of earlier layers.
  // Not under sequence/expert parallelism yet: its NCCL collectives on the model's stream and the
  // sums on the reducer's would be two communicators' kernels in flight at once, which NCCL does
  // not order across ranks (a deadlock risk).
  void begin_grad_reduce(Communicator& comm, GradReduceDtype dtype, size_t bucket_bytes) override {
    if (comm.size() == 1 || bucket_bytes == 0 || gpu_.expert_parallel_size() > 1) return;
    Communicator* device_comm = device_communicator(comm);
    if (device_comm == nullptr) return;
    reducer_.begin(gpu_.grads(), gpu_.grad_ready_ranges(), bucket_bytes / sizeof(float),
                   *device_comm, dtype);
    overlapped_comm_ = &comm;
    overlapped_dtype_ = dtype;
    gpu_.set_grad_ready_hook([this](size_t index) { reducer_.ready(index, gpu_.stream()); });
  }

  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    if (comm.size() == 1) return;
    materialize_zero_grads();
    if (reducer_.active()) {
      MF_CHECK(&comm == overlapped_comm_ && dtype == overlapped_dtype_,
               "all_reduce_grads over another group or dtype than begin_grad_reduce announced");
      gpu_.set_grad_ready_hook(nullptr);
      reducer_.finish(gpu_.stream());
      return;
    }
    if (Communicator* device_comm = device_communicator(comm)) {
      reducer_.begin(gpu_.grads(), gpu_.grad_ready_ranges(), 0, *device_comm, dtype);
      reducer_.finish(gpu_.stream());
      return;
    }
    std::vector<float> grads = gpu_.download_grads();
    all_reduce_gradients(grads.data(), grads.size(), comm, dtype);
    gpu_.upload_grads(grads);
  }

  StepUpdate update(double lr, double max_norm, bool loss_finite) override {
    materialize_zero_grads();
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
    materialize_zero_grads();
    const std::vector<float> grads = gpu_.download_grads();
    return moeforge::first_nonfinite_gradient(gpu_.layout(), grads.data());
  }

  ForwardFn forward_fn() override {
    return [this](const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
      return gpu_.forward_backward(tokens, targets, batch, seq, 0.0);
    };
  }

 private:
  // Gradients read before any backward since zero_grads(): they must be zeros.
  void materialize_zero_grads() {
    if (!grads_pending_zero_) return;
    gpu_.zero_grads();
    grads_pending_zero_ = false;
  }

  // The device communicator over the ranks of `comm` (make_device_communicator), made at the
  // first reduction over comm (collective: every rank of comm reduces at the same step); null,
  // and the gradients go through host memory, when it cannot be made.
  Communicator* device_communicator(Communicator& comm) {
    if (device_comm_parent_ != &comm) {
      std::string why_not;
      device_comm_ = make_device_communicator(comm, reducer_.stream(), &why_not);
      device_comm_parent_ = &comm;
      if (comm.rank() == 0) {
        fmt::print(
            stderr, "gradient sums over {} data-parallel ranks: {}\n", comm.size(),
            device_comm_ ? "on the GPUs through NCCL" : "through host memory (" + why_not + ")");
      }
    }
    return device_comm_.get();
  }

  Transformer<float>& host_model_;
  AdamW& host_optimizer_;
  GpuTransformer gpu_;
  GpuAdamW optimizer_;
  std::unique_ptr<Communicator> ep_comm_;  // the expert-parallel group's, on gpu_'s stream
  BucketedGradReducer reducer_;
  std::unique_ptr<Communicator> device_comm_;
  const Communicator* device_comm_parent_ = nullptr;
  const Communicator* overlapped_comm_ = nullptr;
  GradReduceDtype overlapped_dtype_ = GradReduceDtype::kFloat32;
  bool grads_pending_zero_ = false;
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
