// Shared parts of the GPU group tests (expert_parallel_mpitest.cpp, tensor_parallel_mpitest.cpp):
// a case of the whole batch, one GPU's run of it, each rank's slice of the sequences, and the
// comparison of a group's loss and summed gradients with one GPU's. Both sides run in bf16 with
// different splits of the same sums, so the bounds are gpu_transformer_test.cpp's against the
// fp32 reference: loss 1e-2, each tensor's relative L2 5e-2, routed experts 0.15 of the larger of
// their own gradient and their share of the layer's projection (a near-tie can route a token
// differently).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda/gpu_test_models.h"
#include "cuda/gpu_transformer.h"
#include "model/moe_ffn.h"
#include "model/parameters.h"

namespace moeforge::cuda::testing {

// ".experts.3.up_proj" -> ".experts.*.up_proj"; "" for other tensors.
inline std::string projection_of(const std::string& name) {
  const size_t at = name.find(".experts.");
  if (at == std::string::npos) return "";
  const size_t begin = at + 9, end = name.find('.', begin);
  return name.substr(0, begin) + "*" + name.substr(end);
}

// The inputs of a group run: the model, the whole model's weights, and tokens and targets of the
// whole batch [batch, seq] (each rank gets its seq / ranks positions of every sequence).
struct GroupCase {
  ModelConfig config;
  int64_t batch = 0, seq = 0;
  std::vector<float> params;
  std::vector<int32_t> tokens, targets;
};

inline GroupCase group_case(const ModelConfig& config, int64_t batch, int64_t seq) {
  GroupCase c{config, batch, seq, make_params(ParameterLayout(config), 5), {}, {}};
  Rng rng(17);
  c.tokens.resize(static_cast<size_t>(batch * seq));
  c.targets.resize(c.tokens.size());
  for (size_t i = 0; i < c.tokens.size(); ++i) {
    c.tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    c.targets[i] = i % 11 == 3 ? -1 : static_cast<int32_t>(rng.below(config.vocab_size));
  }
  return c;
}

// Rank `rank` of num_ranks's positions of every sequence of `all` [batch, seq].
inline std::vector<int32_t> rank_positions(const GroupCase& c, const std::vector<int32_t>& all,
                                           int64_t rank, int64_t num_ranks) {
  const int64_t local_seq = c.seq / num_ranks;
  std::vector<int32_t> mine;
  for (int64_t b = 0; b < c.batch; ++b) {
    const auto first = all.begin() + b * c.seq + rank * local_seq;
    mine.insert(mine.end(), first, first + local_seq);
  }
  return mine;
}

// What one GPU computed over the whole batch.
struct OneGpuRun {
  LossBreakdown loss;
  std::vector<float> grads;  // the whole model's layout
  std::vector<MoeFfnStats> stats;
  std::vector<std::vector<float>> router_logits;  // per MoE layer [batch * seq, E]
};

inline OneGpuRun run_one_gpu(const GroupCase& c) {
  GpuTransformer whole(c.config);
  whole.upload_params(c.params);
  whole.zero_grads();
  OneGpuRun run;
  run.loss = whole.forward_backward(c.tokens.data(), c.targets.data(), c.batch, c.seq, 0.5);
  run.grads = whole.download_grads();
  run.stats = whole.moe_stats();
  for (int64_t l = 0; l < c.config.num_layers; ++l) {
    if (c.config.layer_is_moe(l)) run.router_logits.push_back(whole.router_logits(l));
  }
  return run;
}

// A group's loss (every rank's: the group's) and MoE statistics against one GPU's.
inline void expect_loss_matches_one_gpu(const GroupCase& c, const OneGpuRun& want,
                                        const LossBreakdown& loss,
                                        const std::vector<MoeFfnStats>& stats) {
  EXPECT_EQ(loss.num_counted, want.loss.num_counted);
  EXPECT_NEAR(loss.ce_loss, want.loss.ce_loss, 1e-2);
  EXPECT_NEAR(loss.aux_loss, want.loss.aux_loss, 1e-2 * std::max(1.0, want.loss.aux_loss));
  EXPECT_NEAR(loss.z_loss, want.loss.z_loss, 2e-2 * std::max(1.0, want.loss.z_loss));
  EXPECT_EQ(stats.size(), want.stats.size());
  for (size_t m = 0; m < stats.size(); ++m) {
    int64_t routed = 0;
    for (const int64_t load : stats[m].expert_load) routed += load;
    EXPECT_EQ(routed, c.batch * c.seq * c.config.num_experts_per_tok) << "MoE layer " << m;
  }
}

// Every tensor of `local` (tensors of the whole model under their names) in `summed`, the group's
// sum of its gradients, against one GPU's; where names the rank in the messages.
inline void expect_grads_match_one_gpu(const GroupCase& c, const OneGpuRun& want,
                                       const ParameterLayout& local,
                                       const std::vector<float>& summed, const std::string& where) {
  const ModelConfig& config = c.config;
  const ParameterLayout whole(config);
  std::map<std::string, double> projection_sq;
  for (const ParamSpec& spec : whole.specs()) {
    const std::string projection = projection_of(spec.name);
    if (projection.empty()) continue;
    for (int64_t i = 0; i < spec.numel; ++i) {
      projection_sq[projection] +=
          double(want.grads[spec.offset + i]) * want.grads[spec.offset + i];
    }
  }
  for (const ParamSpec& spec : local.specs()) {
    const ParamSpec& at = *whole.find(spec.name);
    double diff_sq = 0.0, ref_sq = 0.0;
    for (int64_t i = 0; i < spec.numel; ++i) {
      const double ref = want.grads[at.offset + i], mine = summed[spec.offset + i];
      diff_sq += (mine - ref) * (mine - ref);
      ref_sq += ref * ref;
    }
    const std::string projection = projection_of(spec.name);
    const double scale =
        projection.empty()
            ? ref_sq
            : std::max(ref_sq, projection_sq[projection] / static_cast<double>(config.num_experts));
    const double bound = projection.empty() ? 5e-2 : 0.15;
    EXPECT_LE(std::sqrt(diff_sq / std::max(scale, 1e-30)), bound)
        << spec.name << " (" << where << ")";
  }
}

// The tensor of `layout` whose gradients differ most (relative L2) between two vectors.
struct TensorDifference {
  std::string name;
  double relative = 0.0;
};
inline TensorDifference max_tensor_difference(const ParameterLayout& layout,
                                              const std::vector<float>& got,
                                              const std::vector<float>& want) {
  TensorDifference worst;
  for (const ParamSpec& spec : layout.specs()) {
    double diff_sq = 0.0, ref_sq = 0.0;
    for (int64_t i = spec.offset; i < spec.offset + spec.numel; ++i) {
      diff_sq += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
      ref_sq += double(want[i]) * want[i];
    }
    const double relative = std::sqrt(diff_sq / std::max(ref_sq, 1e-30));
    if (relative >= worst.relative) worst = {spec.name, relative};
  }
  return worst;
}

}  // namespace moeforge::cuda::testing
