// Our causal GQA attention (attention_fallback.h) through cuda::Attention against ops/attention.h
// in fp64 (attention_test_util.h: FlashAttention's rule, error <= 2 * the error of the same math
// with bf16 roundings + 1e-4; our kernels compute in fp32 and round only their outputs, so they sit
// well inside it): shapes cuDNN rejects, cuDNN's shapes forced onto ours, the automatic choice, and
// the backward's determinism (bit for bit, style rule 6: no atomics, a fixed order of sums).
#include "cuda/attention_fallback.h"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

#include "attention_test_util.h"
#include "core/error.h"
#include "cuda/attention.h"

namespace moeforge::cuda {
namespace {

// Every combination of head_dim 6, 20, 36 (not multiples of 8: cuDNN rejects them), seq 1, 7, 65,
// 130 (not multiples of the 32-row tile; 1 is a lone diagonal, 65 and 130 reach a third and a
// fifth tile) and GQA groups 1, 2, 4, at batch 2.
TEST(AttentionFallbackCuda, MatchesReferenceOnShapesCudnnRejects) {
  MF_REQUIRE_GPU();
  Attention attention(AttentionBackend::ours);
  const std::pair<int64_t, int64_t> heads[] = {{2, 2}, {4, 2}, {8, 2}};  // query, KV
  uint64_t seed = 100;
  for (const int64_t head_dim : {6, 20, 36}) {
    for (const int64_t seq : {1, 7, 65, 130}) {
      for (const auto& [num_q_heads, num_kv_heads] : heads) {
        testing::attention::expect_attention_matches_reference(
            attention, AttentionShape{2, seq, num_q_heads, num_kv_heads, head_dim}, seed);
        seed += 4;
      }
    }
  }
}

// Shapes cuDNN runs, forced onto ours: the larger register tiles (head_dim 64, 128, 256: two,
// four and eight dimensions per lane) over 9 key tiles (seq 257), and the extremes head_dim 1 and
// an odd 7 (a zero-padded last pair in the shared-memory rows).
TEST(AttentionFallbackCuda, MatchesReferenceOnCudnnShapesForcedOntoOurs) {
  MF_REQUIRE_GPU();
  Attention attention(AttentionBackend::ours);
  const AttentionShape shapes[] = {{2, 257, 4, 2, 64},  {2, 257, 8, 2, 128}, {1, 257, 4, 1, 64},
                                   {1, 100, 4, 2, 256}, {2, 33, 2, 1, 1},    {2, 40, 6, 3, 7}};
  uint64_t seed = 500;
  for (const AttentionShape& s : shapes) {
    testing::attention::expect_attention_matches_reference(attention, s, seed);
    seed += 4;
  }
}

// The automatic backend on a head_dim cuDNN rejects: its support check sends forward and backward
// to ours (without the fallback, building cuDNN's graph throws); at seq 1 the backward takes the
// single-key kernel.
TEST(AttentionFallbackCuda, AutomaticBackendFallsBackWhereCudnnRejects) {
  MF_REQUIRE_GPU();
  Attention attention;
  testing::attention::expect_attention_matches_reference(attention, AttentionShape{2, 65, 4, 2, 20},
                                                         900);
  testing::attention::expect_attention_matches_reference(attention, AttentionShape{2, 1, 4, 2, 20},
                                                         904);
}

// Two backward runs on the same inputs write the same bits (a race or an uninitialised shared-
// memory read would not), for a group of 4 query heads per KV head and several tiles.
TEST(AttentionFallbackCuda, BackwardIsDeterministic) {
  MF_REQUIRE_GPU();
  Attention attention(AttentionBackend::ours);
  const AttentionShape shapes[] = {{2, 130, 8, 2, 36}, {2, 257, 4, 1, 128}};
  for (const AttentionShape& s : shapes) {
    SCOPED_TRACE(testing::attention::describe(s));
    const testing::attention::Inputs in = testing::attention::make_inputs(s, 1000);
    DeviceBuffer<bf16> q = testing::to_device(in.q), k = testing::to_device(in.k),
                       v = testing::to_device(in.v), dout = testing::to_device(in.dout);
    DeviceBuffer<bf16> out(in.q.size());
    DeviceBuffer<float> lse(static_cast<size_t>(s.batch * s.num_q_heads * s.seq));
    attention.forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s, nullptr);
    std::vector<std::vector<bf16>> runs[2];
    for (auto& grads : runs) {
      DeviceBuffer<bf16> dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
      for (DeviceBuffer<bf16>* buffer : {&dq, &dk, &dv}) testing::fill_garbage(*buffer);
      attention.backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                         out.data(), lse.data(), s, nullptr);
      testing::synchronize();
      grads = {dq.download(), dk.download(), dv.download()};
    }
    testing::expect_equal("dq", runs[1][0], runs[0][0]);
    testing::expect_equal("dk", runs[1][1], runs[0][1]);
    testing::expect_equal("dv", runs[1][2], runs[0][2]);
  }
}

// head_dim above 256 is refused before any launch (these pointers are never read).
TEST(AttentionFallbackCuda, RejectsHeadDimAboveLimit) {
  MF_REQUIRE_GPU();
  Attention attention(AttentionBackend::ours);
  const AttentionShape s{1, 4, 2, 2, kAttentionFallbackMaxHeadDim + 8};
  EXPECT_THROW(attention.forward(nullptr, nullptr, nullptr, nullptr, nullptr, s, nullptr), Error);
  EXPECT_THROW(attention.backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, s, nullptr),
               Error);
}

}  // namespace
}  // namespace moeforge::cuda
