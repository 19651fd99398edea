// ZeRO-1 for a GpuTransformer (train/zero_optimizer.h is the spec): the summed gradient reaches
// the shard owners through a device communicator (NCCL; a reduce-scatter here, or the owner sums
// of BucketedGradReducer beside the backward), each rank runs
// AdamW on its shard only (moments of 1/D of the parameters on its GPU), and the updated shards
// reach every rank as the model reads them: the bf16 copy of every weight all-gathered (half the
// bytes of fp32), and fp32 only for the weights read in fp32 (GpuTransformer::fp32_weight_ranges:
// norms, biases, the embedding table), packed into one all-gather. The other ranks' fp32 master
// weights of the bf16-read matrices are then stale until gather_weights(), which checkpoints call
// first. The shard rule is zero_shard()'s, so the host ZeroAdamW's moments are this one's.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_adamw.h"
#include "cuda/gpu_transformer.h"
#include "cuda/grad_reduce_device.h"
#include "train/adamw.h"
#include "train/grad_reduce.h"
#include "train/zero_optimizer.h"

namespace moeforge::cuda {

class GpuZeroAdamW {
 public:
  // dp: a device communicator whose collectives run on the model's stream; it and model must
  // outlive this object. Pads the model's flat buffers to dp.size() x shard length (the equal
  // chunks of the collectives; GpuTransformer::pad_flat_buffers). Collective calls below must be
  // made by every rank of dp in the same order.
  // expert_group: as GpuAdamW's, the host communicator that completes the norm of a model with
  // sharded experts.
  GpuZeroAdamW(GpuTransformer& model, const AdamWHyper& hyper,
               const std::vector<std::string>& no_decay_substrings, Communicator& dp,
               Communicator* expert_group = nullptr);

  const ZeroShard& shard() const { return shard_; }
  // Elements per rank of the padded flat buffers: rank r's shard starts at r * shard_len().
  int64_t shard_len() const { return shard_len_; }

  // Collective. The sum over the ranks of the model's gradient, kept for this rank's shard only:
  // fp32 reduce-scatter in place (the model's gradient holds the summed shard, the rest of it is
  // left unsummed), or bf16 as train/grad_reduce.h's reduce_scatter_gradients_bf16 (each rank's
  // gradient rounded once to bf16, every rank's copy of the shard summed in fp32 in rank order:
  // the host's bits) into a buffer of its own.
  void reduce_gradients(GradReduceDtype dtype);
  // Instead of reduce_gradients: the model's gradient already holds the fp32 sum over the ranks on
  // this rank's shard (BucketedGradReducer with owner_chunk = shard_len(), overlapped with the
  // backward).
  void use_owner_reduced_gradients();
  // Collective. The L2 norm of the summed gradient: each rank's squared norm of its shard (double),
  // summed over the ranks (with sharded experts, the expert ranges' part then over the expert
  // group).
  double grad_norm();
  // Collective. Clipping at max_norm (<= 0: none) folded into AdamW at lr on this rank's shard,
  // then every rank's updated shard all-gathered into the model's weights as it reads them (see
  // above). Nothing changes when the norm is not finite (every rank sees the same norm, so all
  // skip together).
  GpuAdamWResult step(double lr, double max_norm);
  // Collective. Every rank's fp32 master weights all-gathered, so that the model's whole fp32
  // buffer is current (before download_params).
  void gather_weights();
  // Collective. The index in the layout's specs of the first parameter in backward order (the
  // highest index) whose summed gradient holds a NaN or an infinity in any shard, or -1.
  int64_t first_nonfinite_spec();

  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t n) { step_count_ = n; }
  // This rank's moments [shard.size()].
  std::vector<float> download_exp_avg() const;
  std::vector<float> download_exp_avg_sq() const;
  void upload_state(const std::vector<float>& exp_avg, const std::vector<float>& exp_avg_sq);
  // This rank's summed gradient [shard.size()] (after reduce_gradients).
  std::vector<float> download_grad_shard() const;

 private:
  // The bf16 all-gather of the weights and the packed fp32 all-gather of the fp32-read ones.
  void all_gather_updated_weights();
  // This rank's summed gradient [shard.size()]: in the model's buffer or in bf16_sums_.
  const float* summed_shard() const;

  GpuTransformer& model_;
  AdamWHyper hyper_;
  Communicator& dp_;
  Communicator* expert_group_;
  int64_t shard_len_;
  ZeroShard shard_;
  std::vector<DecayRun> runs_;  // inside the shard
  // Per rank, the pieces of the fp32-read ranges inside its shard, in offset order; each rank
  // packs its own into fp32_send_ (up to fp32_chunk_ elements) for the all-gather into fp32_recv_.
  std::vector<std::vector<GradRange>> fp32_pieces_;
  int64_t fp32_chunk_ = 0;
  DeviceBuffer<float> fp32_send_, fp32_recv_;
  DeviceBuffer<float> exp_avg_, exp_avg_sq_;
  DeviceBuffer<float>
      bf16_sums_;  // the shard's sums of the bf16 reduction (allocated at its first)
  bool sums_in_model_grads_ = true;
  DeviceBuffer<double> norm_sq_, scratch_;
  PinnedHostBuffer<AdamWStep> host_step_;  // [1] the step's constants, uploaded into step_
  DeviceBuffer<AdamWStep> step_;           // [1]
  DeviceBuffer<int64_t> found_;
  DeviceGradReducer reducer_;
  int64_t step_count_ = 0;
};

}  // namespace moeforge::cuda
