// Fused causal GQA attention on the GPU through cuDNN (cuda::Attention's automatic backend on
// shapes cuDNN runs, and seq 1, whose backward has its own kernel) against ops/attention.h in fp64
// (attention_test_util.h has the reference and the tolerances).
#include "cuda/attention.h"

#include <gtest/gtest.h>

#include "attention_test_util.h"

namespace moeforge::cuda {
namespace {

const AttentionShape kShapes[] = {
    {1, 1, 4, 2, 64},    {2, 64, 8, 1, 128}, {1, 100, 6, 3, 64},
    {2, 257, 4, 2, 128}, {1, 257, 8, 1, 64}, {2, 100, 6, 3, 128},
};

TEST(AttentionCuda, ForwardAndBackwardMatchReference) {
  MF_REQUIRE_GPU();
  Attention attention;
  uint64_t seed = 1;
  for (const AttentionShape& s : kShapes) {
    testing::attention::expect_attention_matches_reference(attention, s, seed);
    seed += 4;
  }
}

}  // namespace
}  // namespace moeforge::cuda
