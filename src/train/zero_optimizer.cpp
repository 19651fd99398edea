// ZeRO-1 sharded AdamW: shard rule, gradient reduce-scatter, sharded update, parameter all-gather
// (see zero_optimizer.h).
#include "train/zero_optimizer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace moeforge {

int64_t zero_shard_len(int64_t num_params, int64_t num_ranks) {
  MF_CHECK(num_ranks >= 1 && num_params >= 0,
           "ZeRO-1 shards need num_ranks >= 1 and num_params >= 0, got {} and {}", num_ranks,
           num_params);
  return (num_params + num_ranks - 1) / num_ranks;
}

ZeroShard zero_shard(int64_t num_params, int64_t num_ranks, int64_t rank) {
  MF_CHECK(rank >= 0 && rank < num_ranks, "ZeRO-1 shard of rank {} out of {} ranks", rank,
           num_ranks);
  const int64_t len = zero_shard_len(num_params, num_ranks);
  return ZeroShard{std::min(rank * len, num_params), std::min((rank + 1) * len, num_params)};
}

ZeroAdamW::ZeroAdamW(const ParameterLayout& layout, const AdamWHyper& hyper,
                     const std::vector<std::string>& no_decay_substrings, Communicator& dp,
                     Communicator* expert_group)
    : layout_(layout),
      hyper_(hyper),
      dp_(dp),
      expert_group_(expert_group),
      decay_(decay_flags(layout, no_decay_substrings)),
      shard_len_(zero_shard_len(layout.num_params(), dp.size())),
      shard_(zero_shard(layout.num_params(), dp.size(), dp.rank())),
      exp_avg_(static_cast<size_t>(shard_.size()), 0.0f),
      exp_avg_sq_(static_cast<size_t>(shard_.size()), 0.0f),
      grad_shard_(static_cast<size_t>(shard_.size()), 0.0f) {}

void ZeroAdamW::reduce_gradients(const float* grads, GradReduceDtype dtype) {
  const auto num_ranks = static_cast<size_t>(dp_.size());
  const auto len = static_cast<size_t>(shard_len_);
  const auto num_params = static_cast<size_t>(layout_.num_params());
  std::vector<float> own(len);  // this rank's shard, padded to shard_len
  if (dtype == GradReduceDtype::kFloat32) {
    std::vector<float> send(len * num_ranks, 0.0f);  // [num_ranks, shard_len], zero padded
    std::copy(grads, grads + num_params, send.begin());
    dp_.reduce_scatter_sum(send.data(), own.data(), len);
  } else {
    own = reduce_scatter_gradients_bf16(grads, num_params, dp_);
  }
  std::copy(own.begin(), own.begin() + shard_.size(), grad_shard_.begin());
}

double ZeroAdamW::grad_norm() {
  const GradSquares own = grad_squares(layout_, grad_shard_.data(), shard_.begin, shard_.end);
  double parts[2] = {own.replicated, own.experts};
  dp_.all_reduce_sum(parts, 2);
  return model_grad_norm({parts[0], parts[1]}, expert_group_);
}

void ZeroAdamW::clip(double norm, double max_norm) {
  clip_grad_norm(grad_shard_.data(), shard_.size(), norm, max_norm);
}

void ZeroAdamW::step(float* params, double lr) {
  ++step_count_;
  const AdamWStepConstants c(hyper_, lr, step_count_);
  const std::vector<ParamSpec>& specs = layout_.specs();
  for (size_t s = 0; s < specs.size(); ++s) {
    const int64_t begin = std::max(specs[s].offset, shard_.begin);
    const int64_t end = std::min(specs[s].offset + specs[s].numel, shard_.end);
    if (begin >= end) continue;
    const bool decay = decay_[s] != 0;
#pragma omp parallel for schedule(static)
    for (int64_t i = begin; i < end; ++i) {
      const auto local_idx = static_cast<size_t>(i - shard_.begin);
      c.update(params[i], exp_avg_[local_idx], exp_avg_sq_[local_idx], grad_shard_[local_idx],
               decay);
    }
  }
  const auto len = static_cast<size_t>(shard_len_);
  std::vector<float> own(len, 0.0f);  // this rank's updated shard, padded to shard_len
  std::copy(params + shard_.begin, params + shard_.end, own.begin());
  std::vector<float> all(len * static_cast<size_t>(dp_.size()));  // [num_ranks, shard_len]
  dp_.all_gather(own.data(), all.data(), len);
  std::copy(all.begin(), all.begin() + layout_.num_params(), params);
}

int64_t last_nonfinite_spec(const ParameterLayout& layout, const ZeroShard& shard,
                            const float* values) {
  const std::vector<ParamSpec>& specs = layout.specs();
  for (int64_t s = static_cast<int64_t>(specs.size()) - 1; s >= 0; --s) {
    const ParamSpec& spec = specs[static_cast<size_t>(s)];
    const int64_t begin = std::max(spec.offset, shard.begin);
    const int64_t end = std::min(spec.offset + spec.numel, shard.end);
    for (int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(values[i - shard.begin])) return s;
    }
  }
  return -1;
}

int64_t ZeroAdamW::first_nonfinite_spec() {
  const int64_t found = last_nonfinite_spec(layout_, shard_, grad_shard_.data());
  std::vector<int64_t> per_rank(static_cast<size_t>(dp_.size()));
  dp_.all_gather(&found, per_rank.data(), 1);
  return *std::max_element(per_rank.begin(), per_rank.end());
}

void ZeroAdamW::gather_state(std::vector<float>& exp_avg, std::vector<float>& exp_avg_sq) {
  // Every rank sends its shard to rank 0 only; rank 0 receives shard r at its offset.
  const int num_ranks = dp_.size();
  const bool is_root = dp_.rank() == 0;
  const int64_t num_params = layout_.num_params();
  std::vector<size_t> send_counts(num_ranks, 0), send_offsets(num_ranks, 0);
  std::vector<size_t> recv_counts(num_ranks, 0), recv_offsets(num_ranks, 0);
  send_counts[0] = static_cast<size_t>(shard_.size());
  if (is_root) {
    for (int r = 0; r < num_ranks; ++r) {
      const ZeroShard s = zero_shard(num_params, num_ranks, r);
      recv_counts[r] = static_cast<size_t>(s.size());
      recv_offsets[r] = static_cast<size_t>(s.begin);
    }
  }
  for (auto [shard, full] :
       {std::pair{&exp_avg_, &exp_avg}, std::pair{&exp_avg_sq_, &exp_avg_sq}}) {
    full->assign(is_root ? static_cast<size_t>(num_params) : 0, 0.0f);
    dp_.all_to_all_v(shard->data(), send_counts.data(), send_offsets.data(), full->data(),
                     recv_counts.data(), recv_offsets.data(), CommDType::kFloat32);
  }
}

}  // namespace moeforge
