// What the training loop asks of the device that runs the model's math: micro-batch forward and
// backward with gradient accumulation, the gradient reduction over data-parallel ranks, the
// optimizer update, evaluation, and moving weights and optimizer state to and from the host
// model and optimizer (which checkpoints, PMA and evaluation on the CPU read). The CPU engine
// works on the host objects directly; the CUDA engine (src/cuda/gpu_step_engine.h) keeps its own
// device copies and syncs them when asked.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/transformer.h"
#include "train/adamw.h"
#include "train/evaluate.h"
#include "train/grad_reduce.h"
#include "train/zero_optimizer.h"

namespace moeforge {

struct StepUpdate {
  double grad_norm = 0.0;
  bool applied = false;  // false: the loss or the gradient was not finite, nothing changed
};

class StepEngine {
 public:
  virtual ~StepEngine() = default;

  // Takes the host model's weights and the host optimizer's state (after init or resume).
  virtual void load_from_host() = 0;
  // Writes weights and optimizer state back into the host model and optimizer.
  virtual void store_to_host() = 0;

  virtual void zero_grads() = 0;
  // Forward and backward of one micro-batch, gradients scaled by dloss and accumulated; per-MoE-
  // layer statistics appended to stats. ce_count > 0 replaces the micro-batch's own number of
  // counted targets as the cross-entropy's divisor in the backward (Transformer::backward).
  virtual LossBreakdown forward_backward(const int32_t* tokens, const int32_t* targets,
                                         int64_t batch, int64_t seq, double dloss, double ce_count,
                                         std::vector<MoeFfnStats>& stats) = 0;
  // Announces that the next forward_backward is the step's last and that all_reduce_grads(comm,
  // dtype) follows it: an engine may start the sums as its backward finishes gradients, in
  // buckets of bucket_bytes (the CUDA engine does, on GPUs with a device communicator; 0 or the
  // CPU engines: nothing starts early).
  virtual void begin_grad_reduce(Communicator& comm, GradReduceDtype dtype, size_t bucket_bytes) {
    (void)comm;
    (void)dtype;
    (void)bucket_bytes;
  }
  // Sums the gradients over the ranks of comm, in fp32 or bf16-compressed (train/grad_reduce.h).
  // The ZeRO-1 engine reduce-scatters instead (each rank gets the sum of its shard only); comm
  // must then be the group its ZeroAdamW shards over.
  virtual void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) = 0;
  // all_reduce_grads of the given ranges of the flat gradient only: with the model's experts
  // sharded, the replicated ranges go over the world and the expert ranges over the data-parallel
  // group (the ranks holding the same experts).
  virtual void all_reduce_grad_ranges(Communicator& comm, GradReduceDtype dtype,
                                      const std::vector<ParamRange>& ranges) = 0;
  // ZeRO-1 with expert_parallel > 1: the fp32 sum over the sequence/expert group of its ranks'
  // partial gradients of the replicated weights (each rank's tokens), before all_reduce_grads
  // reduce-scatters over the data-parallel group; each rank's experts already have the group's
  // gradient. group is the model's expert group.
  virtual void sum_expert_group_grads(Communicator& group) = 0;
  // Clipping at max_norm and the AdamW step at lr; nothing changes when loss_finite is false or
  // the gradient norm is not finite.
  virtual StepUpdate update(double lr, double max_norm, bool loss_finite) = 0;
  // The first parameter (backward order) whose gradient is not finite, or "none".
  virtual std::string first_nonfinite_gradient() = 0;
  // Forward-only loss, for evaluation.
  virtual ForwardFn forward_fn() = 0;
};

// Builds the engine for a device name ("cpu", "cuda") around the host model and optimizer.
using StepEngineFactory = std::function<std::unique_ptr<StepEngine>(
    const std::string& device, Transformer<float>& model, AdamW& optimizer)>;

// Builds the ZeRO-1 engine for a device name around the host model and sharded optimizer.
using Zero1StepEngineFactory = std::function<std::unique_ptr<StepEngine>(
    const std::string& device, Transformer<float>& model, ZeroAdamW& optimizer)>;

// The CPU engine, over the host objects themselves.
std::unique_ptr<StepEngine> make_cpu_step_engine(Transformer<float>& model, AdamW& optimizer);

// The CPU engine with ZeRO-1: gradients reduce-scattered to the shard owners of optimizer's
// data-parallel group, AdamW on each rank's shard, parameters all-gathered
// (train/zero_optimizer.h).
std::unique_ptr<StepEngine> make_cpu_zero1_step_engine(Transformer<float>& model,
                                                       ZeroAdamW& optimizer);

// The name of the first parameter, in backward order (last layers first), whose gradient holds a
// NaN or an infinity; "none" when all are finite.
std::string first_nonfinite_gradient(const ParameterLayout& layout, const float* grads);

}  // namespace moeforge
