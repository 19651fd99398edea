// MoE router on the GPU against ops/router.h: expert selection exactly equal to the reference's
// (random logits without near-ties), probabilities and gates within fp32 noise of fp64, the aux
// and z losses and exact expert counts, and the backward with both loss terms.
#include "cuda/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "ops/router.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::expect_equal;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

// The last four balance groups of experts in the aux loss (8 experts in 4 groups, 16 in 4, 64 in
// 4, 16 in 1).
const RouterShape kShapes[] = {
    {100, 8, 2, false},    {100, 8, 2, true},    {37, 16, 4, true},      {37, 16, 1, false},
    {1, 8, 2, true},       {100, 16, 4, false},  {257, 64, 8, false},    {37, 256, 8, true},
    {100, 8, 2, false, 4}, {37, 16, 4, true, 4}, {257, 64, 8, false, 4}, {100, 16, 1, true, 1},
};

std::string describe(const RouterShape& s) {
  return "tokens=" + std::to_string(s.num_tokens) + " experts=" + std::to_string(s.num_experts) +
         " top_k=" + std::to_string(s.top_k) + " norm=" + std::to_string(s.norm_topk_prob) +
         " balance_groups=" + std::to_string(s.balance_groups);
}

ops::RouterDims dims_of(const RouterShape& s) {
  return {s.num_tokens, s.num_experts, s.top_k, s.norm_topk_prob, s.balance_groups};
}

// Per token: a random permutation of evenly spaced levels plus a small jitter and a random
// offset, so that no two logits of a token are closer than 0.6 spacings: the top-k selection is
// the same in any precision.
std::vector<float> distinct_logits(const RouterShape& s, uint64_t seed) {
  const int64_t num_experts = s.num_experts;
  const double spacing = num_experts > 16 ? 0.05 : 0.25;
  Rng rng(seed);
  std::vector<float> logits(s.num_tokens * num_experts);
  std::vector<int64_t> level(num_experts);
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    std::iota(level.begin(), level.end(), 0);
    for (int64_t e = num_experts - 1; e > 0; --e) {
      std::swap(level[e], level[static_cast<int64_t>(rng.below(static_cast<uint64_t>(e + 1)))]);
    }
    const double offset = 6.0 * rng.uniform() - 3.0 - 0.5 * spacing * num_experts;
    for (int64_t e = 0; e < num_experts; ++e) {
      const double jitter = (rng.uniform() - 0.5) * 0.4 * spacing;
      logits[t * num_experts + e] = static_cast<float>(offset + spacing * level[e] + jitter);
    }
  }
  return logits;
}

// Relative error of an fp32 softmax of one token: an exp that may be approximate (__expf:
// 2 + 1.17 |x| ulp at argument x = logit - max) and sums over the experts.
std::vector<double> softmax_relative_noise(const std::vector<double>& logits,
                                           const RouterShape& s) {
  std::vector<double> rel(s.num_tokens);
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    const double* row = logits.data() + t * s.num_experts;
    const auto [lo, hi] = std::minmax_element(row, row + s.num_experts);
    rel[t] = (4.0 + 1.2 * (*hi - *lo)) * 0x1.0p-23 + (s.num_experts + 16) * kFloatEps;
  }
  return rel;
}

double logsumexp(const double* row, int64_t count) {
  const double max_logit = *std::max_element(row, row + count);
  double sum = 0.0;
  for (int64_t e = 0; e < count; ++e) sum += std::exp(row[e] - max_logit);
  return max_logit + std::log(sum);
}

// The reference routing of the logits (fp64).
struct Routing {
  std::vector<double> probs, gates;
  std::vector<int32_t> expert_idx;
};

Routing route(const std::vector<double>& logits, const RouterShape& s) {
  Routing r;
  r.probs.resize(s.num_tokens * s.num_experts);
  r.gates.resize(s.num_tokens * s.top_k);
  r.expert_idx.resize(s.num_tokens * s.top_k);
  ops::router_forward<double>(r.probs.data(), r.expert_idx.data(), r.gates.data(), logits.data(),
                              dims_of(s));
  return r;
}

TEST(RouterCuda, ForwardSelectsExactlyTheReferenceExperts) {
  MF_REQUIRE_GPU();
  uint64_t seed = 1;
  for (const RouterShape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    const std::vector<float> logits = distinct_logits(s, seed++);
    const std::vector<double> logits_d = to_double(logits);
    const Routing ref = route(logits_d, s);

    DeviceBuffer<float> logits_dev = to_device(logits), probs(s.num_tokens * s.num_experts),
                        gates(s.num_tokens * s.top_k);
    DeviceBuffer<int32_t> expert_idx(s.num_tokens * s.top_k);
    testing::fill_garbage(probs);
    testing::fill_garbage(gates);
    testing::fill_garbage(expert_idx);
    router_forward(probs.data(), expert_idx.data(), gates.data(), logits_dev.data(), s, nullptr);
    testing::synchronize();

    expect_equal("expert_idx", expert_idx.download(), ref.expert_idx);
    const std::vector<double> rel = softmax_relative_noise(logits_d, s);
    std::vector<double> probs_noise(ref.probs.size()), gates_noise(ref.gates.size());
    for (size_t i = 0; i < probs_noise.size(); ++i) {
      probs_noise[i] = 2.0 * rel[i / s.num_experts] * ref.probs[i];
    }
    for (size_t i = 0; i < gates_noise.size(); ++i) {
      gates_noise[i] = 4.0 * rel[i / s.top_k] * ref.gates[i];
    }
    expect_close("probs", download_double(probs), ref.probs, probs_noise);
    expect_close("gates", download_double(gates), ref.gates, gates_noise);
  }
}

TEST(RouterCuda, LossesAndExpertCountsMatchReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const RouterShape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    const std::vector<float> logits = distinct_logits(s, seed++);
    const std::vector<double> logits_d = to_double(logits);
    const Routing ref = route(logits_d, s);
    // The device reads fp32 probabilities; the reference uses the same values.
    const std::vector<float> probs(ref.probs.begin(), ref.probs.end());
    const std::vector<double> probs_d = to_double(probs);
    const ops::RouterDims dims = dims_of(s);
    const double aux_ref =
        ops::router_aux_loss<double>(probs_d.data(), ref.expert_idx.data(), dims);
    const double z_ref = ops::router_z_loss<double>(logits_d.data(), dims);
    std::vector<int32_t> counts_ref(s.num_experts, 0);
    for (const int32_t e : ref.expert_idx) ++counts_ref[e];

    DeviceBuffer<float> logits_dev = to_device(logits), probs_dev = to_device(probs), losses(2);
    DeviceBuffer<int32_t> expert_idx = to_device(ref.expert_idx), expert_counts(s.num_experts);
    DeviceBuffer<float> scratch(std::max<int64_t>(router_loss_scratch_floats(s), 1));
    testing::fill_garbage(losses);
    testing::fill_garbage(expert_counts);
    testing::fill_garbage(scratch);
    router_losses(losses.data(), expert_counts.data(), scratch.data(), probs_dev.data(),
                  expert_idx.data(), logits_dev.data(), s, nullptr);
    testing::synchronize();

    expect_equal("expert_counts", expert_counts.download(), counts_ref);
    // aux: column sums of n probabilities and a sum over experts, in fp32 at worst.
    const double aux_noise = (s.num_tokens + s.num_experts + 16) * 2.0 * kFloatEps * aux_ref;
    // z: per token lse is off by about rel + 2 u |lse|; squared and averaged over n tokens.
    const std::vector<double> rel = softmax_relative_noise(logits_d, s);
    double z_noise = (s.num_tokens + 8) * kFloatEps * z_ref;
    for (int64_t t = 0; t < s.num_tokens; ++t) {
      const double lse = std::abs(logsumexp(logits_d.data() + t * s.num_experts, s.num_experts));
      z_noise += 2.0 * lse * (rel[t] + 2.0 * kFloatEps * lse) / s.num_tokens;
    }
    const std::vector<double> losses_got = download_double(losses);
    expect_close("aux loss", {losses_got[0]}, {aux_ref}, aux_noise);
    expect_close("z loss", {losses_got[1]}, {z_ref}, z_noise);
  }
}

TEST(RouterCuda, BackwardMatchesReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 200;
  const float d_aux = 0.01f, d_z = 0.001f;
  for (const RouterShape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    const int64_t num_experts = s.num_experts, top_k = s.top_k, n = s.num_tokens;
    const std::vector<float> logits = distinct_logits(s, seed++);
    const std::vector<double> logits_d = to_double(logits);
    const Routing ref = route(logits_d, s);
    const std::vector<float> probs(ref.probs.begin(), ref.probs.end());
    const std::vector<double> probs_d = to_double(probs);
    const std::vector<float> dgates = testing::random_normal(n * top_k, seed++);
    const std::vector<double> dgates_d = to_double(dgates);
    std::vector<int32_t> counts(num_experts, 0);
    for (const int32_t e : ref.expert_idx) ++counts[e];

    std::vector<double> dlogits_ref(n * num_experts);
    ops::router_backward<double>(dlogits_ref.data(), dgates_d.data(), logits_d.data(),
                                 probs_d.data(), ref.expert_idx.data(), d_aux, d_z, dims_of(s));

    DeviceBuffer<float> logits_dev = to_device(logits), probs_dev = to_device(probs),
                        dgates_dev = to_device(dgates);
    DeviceBuffer<int32_t> expert_idx = to_device(ref.expert_idx), counts_dev = to_device(counts);
    DeviceBuffer<bf16> dlogits(n * num_experts);
    testing::fill_garbage(dlogits);
    router_backward(dlogits.data(), dgates_dev.data(), logits_dev.data(), probs_dev.data(),
                    expert_idx.data(), counts_dev.data(), d_aux, d_z, s, nullptr);

    // Noise from the magnitudes of the terms of the reference's formula.
    const std::vector<double> rel = softmax_relative_noise(logits_d, s);
    std::vector<double> noise(n * num_experts);
    for (int64_t t = 0; t < n; ++t) {
      const double* p = probs_d.data() + t * num_experts;
      const int32_t* idx = ref.expert_idx.data() + t * top_k;
      const double* dg = dgates_d.data() + t * top_k;
      std::vector<double> dprobs_mag(num_experts);
      for (int64_t e = 0; e < num_experts; ++e) {
        dprobs_mag[e] =
            std::abs(d_aux) * num_experts * counts[e] / static_cast<double>(n * top_k) / n;
      }
      if (s.norm_topk_prob) {
        double selected = 0.0, weighted = 0.0;
        for (int64_t j = 0; j < top_k; ++j) selected += p[idx[j]];
        for (int64_t j = 0; j < top_k; ++j) weighted += std::abs(dg[j]) * p[idx[j]] / selected;
        for (int64_t j = 0; j < top_k; ++j)
          dprobs_mag[idx[j]] += (std::abs(dg[j]) + weighted) / selected;
      } else {
        for (int64_t j = 0; j < top_k; ++j) dprobs_mag[idx[j]] += std::abs(dg[j]);
      }
      double dot_mag = 0.0;
      for (int64_t e = 0; e < num_experts; ++e) dot_mag += dprobs_mag[e] * p[e];
      const double lse = std::abs(logsumexp(logits_d.data() + t * num_experts, num_experts));
      const double z_mag = std::abs(d_z) * 2.0 * lse / n;
      const double z_err = std::abs(d_z) * 2.0 / n * (rel[t] + 2.0 * kFloatEps * lse);
      for (int64_t e = 0; e < num_experts; ++e) {
        noise[t * num_experts + e] =
            p[e] *
            ((dprobs_mag[e] + dot_mag + z_mag) * (2.0 * rel[t] + (top_k + 16) * kFloatEps) + z_err);
      }
    }
    expect_close("dlogits", download_double(dlogits), dlogits_ref,
                 testing::bf16_bound(dlogits_ref, noise));
  }
}

// The all-to-all dispatch's group losses (RouterShape::loss_tokens): the tokens split in two
// "ranks" at a chunk boundary (128 tokens), each half's router_loss_sums added in fp32 as a
// two-rank all-reduce adds them, and router_losses_from_sums over all the tokens give
// router_losses' bits over the whole; router_backward of a half with loss_tokens and the whole's
// counts gives the whole's rows of dlogits bit for bit (the same arithmetic per token).
TEST(RouterCuda, GroupLossesAndGradientsFromHalvesEqualTheWhole) {
  MF_REQUIRE_GPU();
  uint64_t seed = 300;
  const float d_aux = 0.01f, d_z = 0.001f;
  for (const RouterShape& whole :
       {RouterShape{256, 8, 2, false}, RouterShape{256, 16, 4, true, 4}}) {
    SCOPED_TRACE(describe(whole));
    const int64_t n = whole.num_tokens, half = n / 2, num_experts = whole.num_experts;
    const int64_t top_k = whole.top_k;
    const std::vector<float> logits = distinct_logits(whole, seed++);
    const Routing ref = route(to_double(logits), whole);
    const std::vector<float> probs(ref.probs.begin(), ref.probs.end());
    const std::vector<float> dgates = testing::random_normal(n * top_k, seed++);
    DeviceBuffer<float> logits_dev = to_device(logits), probs_dev = to_device(probs);
    DeviceBuffer<float> dgates_dev = to_device(dgates);
    DeviceBuffer<int32_t> expert_idx = to_device(ref.expert_idx);

    DeviceBuffer<float> want_losses(2), scratch(router_loss_scratch_floats(whole));
    DeviceBuffer<int32_t> counts(num_experts);
    router_losses(want_losses.data(), counts.data(), scratch.data(), probs_dev.data(),
                  expert_idx.data(), logits_dev.data(), whole, nullptr);
    DeviceBuffer<bf16> want_dlogits(n * num_experts);
    router_backward(want_dlogits.data(), dgates_dev.data(), logits_dev.data(), probs_dev.data(),
                    expert_idx.data(), counts.data(), d_aux, d_z, whole, nullptr);

    RouterShape part = whole;
    part.num_tokens = half;
    part.loss_tokens = n;
    std::vector<float> group_sums(num_experts + 1, 0.0f);
    std::vector<int32_t> group_counts(num_experts, 0);
    DeviceBuffer<float> sums(num_experts + 1), part_scratch(router_loss_scratch_floats(part));
    DeviceBuffer<int32_t> part_counts(num_experts);
    for (int64_t r = 0; r < 2; ++r) {
      router_loss_sums(sums.data(), part_counts.data(), part_scratch.data(),
                       probs_dev.data() + r * half * num_experts,
                       expert_idx.data() + r * half * top_k,
                       logits_dev.data() + r * half * num_experts, part, nullptr);
      const std::vector<float> got = sums.download();
      const std::vector<int32_t> got_counts = part_counts.download();
      for (int64_t e = 0; e <= num_experts; ++e) group_sums[e] += got[e];
      for (int64_t e = 0; e < num_experts; ++e) group_counts[e] += got_counts[e];
    }
    expect_equal("group counts", group_counts, counts.download());
    DeviceBuffer<float> group_sums_dev = to_device(group_sums), losses(2);
    DeviceBuffer<int32_t> group_counts_dev = to_device(group_counts);
    router_losses_from_sums(losses.data(), group_sums_dev.data(), group_counts_dev.data(), part,
                            nullptr);
    EXPECT_EQ(losses.download(), want_losses.download());

    DeviceBuffer<bf16> dlogits(half * num_experts);
    const std::vector<bf16> want = want_dlogits.download();
    for (int64_t r = 0; r < 2; ++r) {
      router_backward(
          dlogits.data(), dgates_dev.data() + r * half * top_k,
          logits_dev.data() + r * half * num_experts, probs_dev.data() + r * half * num_experts,
          expert_idx.data() + r * half * top_k, group_counts_dev.data(), d_aux, d_z, part, nullptr);
      const std::vector<bf16> got = dlogits.download();
      for (int64_t i = 0; i < half * num_experts; ++i) {
        ASSERT_EQ(testing::bf16_bits(got[i]), testing::bf16_bits(want[r * half * num_experts + i]))
            << "half " << r << " element " << i;
      }
    }
  }
}

}  // namespace
}  // namespace moeforge::cuda
