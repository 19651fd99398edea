// ZeRO-1: AdamW with its state sharded over the data-parallel ranks. The gradient sum is
// reduce-scattered to the shard owners, each rank updates only its shard of the parameters (and
// holds the moments of that shard only: 1/D of AdamW's memory), and the updated shards are
// all-gathered in fp32 so that every rank again holds the whole parameter buffer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/parameters.h"
#include "train/adamw.h"
#include "train/grad_reduce.h"

namespace moeforge {

// The flat parameter range [begin, end) that one rank owns.
struct ZeroShard {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

// The shard rule: with D ranks every shard spans shard_len = ceil(num_params / D) elements of the
// flat buffer, rank r owning [min(r * shard_len, num_params), min((r + 1) * shard_len,
// num_params)); only the last shards are shorter (possibly empty). These are the chunks of the
// bf16 gradient reduction (train/grad_reduce.h), and D * shard_len is the padded length that the
// equal-chunk reduce-scatter and all-gather exchange.
int64_t zero_shard_len(int64_t num_params, int64_t num_ranks);
ZeroShard zero_shard(int64_t num_params, int64_t num_ranks, int64_t rank);

// The index in layout's specs of the last spec (the first in backward order) that holds a NaN or an
// infinity among a shard's values (values[i] is element shard.begin + i of the flat buffer), or -1.
int64_t last_nonfinite_spec(const ParameterLayout& layout, const ZeroShard& shard,
                            const float* values);

// The update equals the unsharded AdamW's bit for bit: the gradient of each element is the same
// rank-ordered sum (the communicator's reduce-scatter sums in the rank order of its all-reduce;
// the bf16 path sums the same chunks without the final all-gather), clipping multiplies by the
// same float factor and AdamW is element-wise. Only the gradient norm's double sum is grouped
// differently (per shard, then over ranks in rank order), which changes it by double rounding
// (~1e-16 relative); that reaches the float clipping factor only when it lies on a float rounding
// boundary.
class ZeroAdamW {
 public:
  // Shards layout over the ranks of dp, which must outlive this object. Collective calls below
  // must be made by every rank of dp in the same order. When layout's experts are sharded,
  // expert_group (the ranks holding the other shards) completes the gradient norm.
  ZeroAdamW(const ParameterLayout& layout, const AdamWHyper& hyper,
            const std::vector<std::string>& no_decay_substrings, Communicator& dp,
            Communicator* expert_group = nullptr);

  const ZeroShard& shard() const { return shard_; }
  Communicator& comm() const { return dp_; }

  // Collective. The sum over the ranks of grads [num_params] (fp32 reduce-scatter, or bf16 as in
  // train/grad_reduce.h without its all-gather), kept for this rank's shard only.
  void reduce_gradients(const float* grads, GradReduceDtype dtype);
  // Collective. The L2 norm of the summed gradient: each rank's squared norm of its shard, summed
  // over the ranks in rank order (one double all-reduce; with sharded experts the expert ranges'
  // part then over the expert group, model_grad_norm).
  double grad_norm();
  // Scales the shard's gradient by min(1, max_norm / (norm + 1e-6)) like clip_grad_norm.
  void clip(double norm, double max_norm);
  // Collective. AdamW at lr on this rank's shard of params [num_params], then every rank's updated
  // shard all-gathered into params.
  void step(float* params, double lr);
  // Collective. The index in layout.specs() of the first parameter in backward order (the highest
  // index) whose summed gradient holds a NaN or an infinity in any shard, or -1 when none does.
  int64_t first_nonfinite_spec();

  // Collective. On rank 0 of dp, the whole moments [num_params] in layout order; elsewhere empty.
  void gather_state(std::vector<float>& exp_avg, std::vector<float>& exp_avg_sq);

  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t n) { step_count_ = n; }
  std::vector<float>& exp_avg() { return exp_avg_; }                    // [shard.size()]
  std::vector<float>& exp_avg_sq() { return exp_avg_sq_; }              // [shard.size()]
  const std::vector<float>& grad_shard() const { return grad_shard_; }  // [shard.size()]

 private:
  const ParameterLayout& layout_;
  AdamWHyper hyper_;
  Communicator& dp_;
  Communicator* expert_group_;
  std::vector<uint8_t> decay_;  // per ParamSpec
  int64_t shard_len_;           // ceil(num_params / D)
  ZeroShard shard_;
  std::vector<float> exp_avg_, exp_avg_sq_, grad_shard_;
  int64_t step_count_ = 0;
};

}  // namespace moeforge
