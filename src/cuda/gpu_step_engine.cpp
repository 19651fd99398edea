// The trainer's CUDA step engines: GpuTransformer with GpuAdamW (gradients summed over the
// data-parallel ranks), or with ZeRO-1's GpuZeroAdamW (reduce-scattered to the shard owners).
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
#include "cuda/gpu_zero_adamw.h"

namespace moeforge::cuda {
namespace {

// What both CUDA engines share: the GpuTransformer (with its expert- or tensor-parallel group, as
// parallel.layout says), the lazy zeroing of the gradients and the forward/backward.
class GpuModelEngine : public StepEngine {
 public:
  GpuModelEngine(Transformer<float>& model, const GpuModelOptions& options)
      : host_model_(model), gpu_(model.config(), options.recompute, model.layout().expert_shard()) {
    Communicator& group = model.expert_group();
    const bool tensor_parallel = model.parallel_layout() == ParallelLayout::kTensor;
    MF_CHECK(!tensor_parallel || !options.cuda_graphs,
             "--cuda-graphs replays one GPU's step; parallel.layout \"tp\" runs its exchanges "
             "eagerly (leave out --cuda-graphs, or use parallel.layout \"sp_ep\" with "
             "parallel.expert_parallel 1)");
    if (group.size() > 1) {
      std::string why_not;
      ep_comm_ = make_device_communicator(group, gpu_.stream(), &why_not);
      MF_CHECK(ep_comm_ != nullptr,
               "parallel.expert_parallel {} on GPUs exchanges activations through NCCL, but {}",
               group.size(), why_not);
      if (tensor_parallel) {
        // Each rank holds every weight (the host model's layout) and uses its slices of them.
        gpu_.set_tensor_parallel_group(*ep_comm_);
      } else {
        // Each MoE layer's dispatch as the host model runs it (parallel.ep_dispatch).
        ExpertExchange exchange = options.ep_exchange;
        exchange.dispatch = model.ep_dispatch();
        gpu_.set_expert_parallel_group(*ep_comm_, exchange);
      }
    }
    if (options.cuda_graphs) gpu_.set_cuda_graphs(true);
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

  ForwardFn forward_fn() override {
    return [this](const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
      return gpu_.forward_backward(tokens, targets, batch, seq, 0.0);
    };
  }

  // On the model's stream, through the expert group's NCCL communicator (the one its Ulysses and
  // dispatch exchanges use), over the replicated ranges only: each rank's experts have the group's
  // gradient already.
  void sum_expert_group_grads(Communicator& group) override {
    MF_CHECK(&group == &host_model_.expert_group(),
             "the expert-group gradient sum runs over the model's expert group only");
    if (group.size() == 1) return;
    materialize_zero_grads();
    for (const ParamRange& r : gpu_.layout().replicated_ranges()) {
      ep_comm_->all_reduce_sum(gpu_.grads() + r.offset, static_cast<size_t>(r.count),
                               CommDType::kFloat32);
    }
  }

  // After the backward, range by range through NCCL on the reducer's stream (through host
  // memory without a device communicator).
  void all_reduce_grad_ranges(Communicator& comm, GradReduceDtype dtype,
                              const std::vector<ParamRange>& ranges) override {
    MF_CHECK(!reducer_.active(), "all_reduce_grad_ranges while overlapped sums are in flight");
    if (comm.size() == 1) return;
    materialize_zero_grads();
    if (Communicator* device_comm = device_communicator(comm)) {
      reducer_.sum_ranges(gpu_.grads(), ranges, *device_comm, dtype, gpu_.stream());
      return;
    }
    std::vector<float> grads = gpu_.download_grads();
    all_reduce_gradient_ranges(grads.data(), ranges, comm, dtype);
    gpu_.upload_grads(grads);
  }

  // The host expert group when the model's experts are sharded (it completes the gradient norm),
  // else null.
  Communicator* expert_norm_group() const {
    return host_model_.layout().experts_sharded() ? &host_model_.expert_group() : nullptr;
  }

 protected:
  // Gradients read before any backward since zero_grads(): they must be zeros.
  void materialize_zero_grads() {
    if (!grads_pending_zero_) return;
    gpu_.zero_grads();
    grads_pending_zero_ = false;
  }

  // Starts the sums over comm of the next backward's gradients in buckets of bucket_bytes, on the
  // reducer's stream as the backward finishes them (owner_chunk > 0: onto the ZeRO-1 shard
  // owners only); false, and nothing starts, with one rank, no buckets, no device communicator,
  // or under sequence/expert or tensor parallelism: its NCCL collectives on the model's stream and
  // the sums on the reducer's would be two communicators' kernels in flight at once, which NCCL
  // does not order across ranks (a deadlock risk); or with CUDA graphs, which cannot call the hook
  // that starts each bucket.
  bool begin_overlapped_sums(Communicator& comm, GradReduceDtype dtype, size_t bucket_bytes,
                             int64_t owner_chunk) {
    if (comm.size() == 1 || bucket_bytes == 0 || gpu_.expert_parallel_size() > 1 ||
        gpu_.tensor_parallel_size() > 1 || gpu_.cuda_graphs()) {
      return false;
    }
    Communicator* device_comm = device_communicator(comm);
    if (device_comm == nullptr) return false;
    reducer_.begin(gpu_.grads(), gpu_.grad_ready_ranges(), bucket_bytes / sizeof(float),
                   *device_comm, dtype, owner_chunk);
    gpu_.set_grad_ready_hook([this](size_t index) { reducer_.ready(index, gpu_.stream()); });
    return true;
  }

  // The rest of the sums begin_overlapped_sums started; the model's stream waits for them all.
  void finish_overlapped_sums() {
    gpu_.set_grad_ready_hook(nullptr);
    reducer_.finish(gpu_.stream());
  }

  // The device communicator over the ranks of `comm` (make_device_communicator) on the reducer's
  // stream, made at the first reduction over comm (collective: every rank of comm reduces at the
  // same step) and kept (with sharded experts the sums go over two groups); null, and the
  // gradients go through host memory, when it cannot be made.
  Communicator* device_communicator(Communicator& comm) {
    for (const auto& [parent, device] : device_comms_) {
      if (parent == &comm) return device.get();
    }
    std::string why_not;
    std::unique_ptr<Communicator> device =
        make_device_communicator(comm, reducer_.stream(), &why_not);
    if (comm.rank() == 0) {
      fmt::print(stderr, "gradient sums over {} ranks: {}\n", comm.size(),
                 device ? "on the GPUs through NCCL" : "through host memory (" + why_not + ")");
    }
    return device_comms_.emplace_back(&comm, std::move(device)).second.get();
  }

  Transformer<float>& host_model_;
  GpuTransformer gpu_;
  BucketedGradReducer reducer_;

 private:
  std::vector<std::pair<const Communicator*, std::unique_ptr<Communicator>>> device_comms_;
  std::unique_ptr<Communicator> ep_comm_;  // the expert-parallel group's, on gpu_'s stream
  bool grads_pending_zero_ = false;
};

class GpuStepEngine final : public GpuModelEngine {
 public:
  GpuStepEngine(Transformer<float>& model, AdamW& optimizer, const AdamWHyper& hyper,
                const std::vector<std::string>& no_decay, const GpuModelOptions& options)
      : GpuModelEngine(model, options),
        host_optimizer_(optimizer),
        optimizer_(gpu_, hyper, no_decay, expert_norm_group()) {
    if (options.cuda_graphs) optimizer_.set_cuda_graphs(true);
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

  // On the GPUs, the sums of the last micro-batch's gradients start on the reducer's stream as
  // its backward finishes them (buckets of bucket_bytes), beside the backward of earlier layers
  // (not under sequence/expert or tensor parallelism: begin_overlapped_sums says why).
  void begin_grad_reduce(Communicator& comm, GradReduceDtype dtype, size_t bucket_bytes) override {
    if (!begin_overlapped_sums(comm, dtype, bucket_bytes, 0)) return;
    overlapped_comm_ = &comm;
    overlapped_dtype_ = dtype;
  }

  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    if (comm.size() == 1) return;
    materialize_zero_grads();
    if (reducer_.active()) {
      MF_CHECK(&comm == overlapped_comm_ && dtype == overlapped_dtype_,
               "all_reduce_grads over another group or dtype than begin_grad_reduce announced");
      finish_overlapped_sums();
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

 private:
  AdamW& host_optimizer_;
  GpuAdamW optimizer_;
  const Communicator* overlapped_comm_ = nullptr;
  GradReduceDtype overlapped_dtype_ = GradReduceDtype::kFloat32;
};

// ZeRO-1 (cuda/gpu_zero_adamw.h): the gradients summed over the data-parallel group that shards
// the host ZeroAdamW onto each shard's owner, in fp32 in buckets beside the backward
// (BucketedGradReducer's owner sums) or, in bf16 or without buckets, reduce-scattered through
// NCCL on the model's stream after the backward; the moments of this rank's shard on its GPU, the
// host's shard vectors synced for checkpoints (the fp32 weights all-gathered first: between
// checkpoints the other ranks' are only current where the model reads fp32).
class GpuZero1StepEngine final : public GpuModelEngine {
 public:
  GpuZero1StepEngine(Transformer<float>& model, ZeroAdamW& optimizer, const AdamWHyper& hyper,
                     const std::vector<std::string>& no_decay, const GpuModelOptions& options)
      : GpuModelEngine(model, options), host_optimizer_(optimizer) {
    std::string why_not;
    dp_ = make_device_communicator(optimizer.comm(), gpu_.stream(), &why_not);
    MF_CHECK(dp_ != nullptr,
             "parallel.zero_stage 1 on GPUs reduce-scatters the gradients through NCCL, but {}",
             why_not);
    optimizer_ = std::make_unique<GpuZeroAdamW>(gpu_, hyper, no_decay, *dp_, expert_norm_group());
    MF_CHECK(optimizer_->shard().begin == optimizer.shard().begin &&
                 optimizer_->shard().end == optimizer.shard().end,
             "the GPU's ZeRO-1 shard [{}, {}) is not the host optimizer's [{}, {})",
             optimizer_->shard().begin, optimizer_->shard().end, optimizer.shard().begin,
             optimizer.shard().end);
    if (optimizer.comm().rank() == 0) {
      fmt::print(stderr,
                 "ZeRO-1 over {} data-parallel ranks on the GPUs through NCCL: each holds AdamW's "
                 "state of {} of the {} parameters\n",
                 optimizer.comm().size(), optimizer.shard().size(), gpu_.num_params());
    }
  }

  void load_from_host() override {
    gpu_.upload_params(host_model_.params());
    optimizer_->upload_state(host_optimizer_.exp_avg(), host_optimizer_.exp_avg_sq());
    optimizer_->set_step_count(host_optimizer_.step_count());
  }

  void store_to_host() override {
    optimizer_->gather_weights();
    host_model_.params() = gpu_.download_params();
    host_optimizer_.exp_avg() = optimizer_->download_exp_avg();
    host_optimizer_.exp_avg_sq() = optimizer_->download_exp_avg_sq();
    host_optimizer_.set_step_count(optimizer_->step_count());
  }

  void begin_grad_reduce(Communicator& comm, GradReduceDtype dtype, size_t bucket_bytes) override {
    check_sharding_group(comm);
    if (dtype == GradReduceDtype::kFloat32) {
      begin_overlapped_sums(comm, dtype, bucket_bytes, optimizer_->shard_len());
    }
  }

  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    check_sharding_group(comm);
    materialize_zero_grads();
    if (reducer_.active()) {
      MF_CHECK(dtype == GradReduceDtype::kFloat32,
               "all_reduce_grads in another dtype than begin_grad_reduce announced");
      finish_overlapped_sums();
      optimizer_->use_owner_reduced_gradients();
      return;
    }
    optimizer_->reduce_gradients(dtype);
  }

  StepUpdate update(double lr, double max_norm, bool loss_finite) override {
    StepUpdate result;
    if (!loss_finite) {
      result.grad_norm = optimizer_->grad_norm();
      return result;
    }
    const GpuAdamWResult r = optimizer_->step(lr, max_norm);
    result.grad_norm = r.grad_norm;
    result.applied = r.applied;
    return result;
  }

  std::string first_nonfinite_gradient() override {
    const int64_t spec = optimizer_->first_nonfinite_spec();
    return spec < 0 ? "none" : gpu_.layout().specs()[static_cast<size_t>(spec)].name;
  }

 private:
  void check_sharding_group(const Communicator& comm) const {
    MF_CHECK(&comm == &host_optimizer_.comm(),
             "with ZeRO-1 the gradients are summed onto their shard owners over the data-parallel "
             "group that shards the optimizer state, not over another communicator");
  }

  ZeroAdamW& host_optimizer_;
  std::unique_ptr<Communicator> dp_;  // the data-parallel group's, on gpu_'s stream
  std::unique_ptr<GpuZeroAdamW> optimizer_;
};

}  // namespace

std::unique_ptr<StepEngine> make_gpu_step_engine(Transformer<float>& model, AdamW& optimizer,
                                                 const AdamWHyper& hyper,
                                                 const std::vector<std::string>& no_decay,
                                                 const GpuModelOptions& options) {
  // Under mpirun every rank of a host gets its own GPU (by local rank) before any allocation.
  bind_device_to_local_rank(local_rank_from_environment());
  return std::make_unique<GpuStepEngine>(model, optimizer, hyper, no_decay, options);
}

std::unique_ptr<StepEngine> make_gpu_zero1_step_engine(Transformer<float>& model,
                                                       ZeroAdamW& optimizer,
                                                       const AdamWHyper& hyper,
                                                       const std::vector<std::string>& no_decay,
                                                       const GpuModelOptions& options) {
  bind_device_to_local_rank(local_rank_from_environment());
  return std::make_unique<GpuZero1StepEngine>(model, optimizer, hyper, no_decay, options);
}

}  // namespace moeforge::cuda
