// Step 8's fp32 logits (cuda::fp32_q_block_means, then fp32_block_logits;
// cuda/flex_prefill_fp32_blocks.cu) against the reference's doubles within the bound of
// cuda/flex_prefill_fp32.h (testing::flex::step8_logits), on block sizes 64 and 128, GQA groups 1
// to 4, N not a multiple of the block, head_dim 40 to 256 and more than one 64 x 64 tile of blocks;
// heads that are not query-aware keep what tri held.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_stages.h"
#include "flex_prefill_test_util.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::to_device;
using testing::flex::Case;
using testing::flex::describe;
using testing::flex::dims_of;
using testing::flex::make_inputs;
using testing::flex::params_of;
using testing::flex::step8_logits;
using testing::flex::Step8Logits;

constexpr double kUntouched = -7.0;  // what tri holds before the call

const Case kCases[] = {
    {1000, 4, 4, 64, 64},   {1900, 4, 2, 128, 128}, {1500, 4, 1, 40, 64},
    {1300, 2, 1, 256, 128}, {9000, 4, 2, 128, 64},  {4500, 2, 2, 72, 64},
};

TEST(FlexPrefillFp32Blocks, LogitsWithinTheBoundOfTheReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 301;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const testing::flex::Inputs in = make_inputs(c, seed++);
    const flex::SearchShape s =
        flex::search_shape(dims_of(c), params_of(c, 0.9, 0.1), "fp32 block logits test");
    const int64_t nb = s.num_blocks, num_tri = nb * (nb + 1) / 2;
    DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
    DeviceBuffer<double> k_means(static_cast<size_t>(c.num_kv_heads * nb * c.head_dim));
    flex::block_means(k_means.data(), k.data(), c.num_kv_heads, 1.0, nullptr, s, nullptr);
    std::vector<int32_t> query_aware(static_cast<size_t>(c.num_q_heads));
    for (int64_t h = 0; h < c.num_q_heads; ++h) query_aware[h] = h % 3 != 1 ? 1 : 0;
    DeviceBuffer<int32_t> flags = to_device(query_aware);
    DeviceBuffer<double> tri =
        to_device(std::vector<double>(static_cast<size_t>(c.num_q_heads * num_tri), kUntouched));
    DeviceBuffer<float> q_means(static_cast<size_t>(c.num_q_heads * s.num_blocks * c.head_dim));
    fp32_q_block_means(q_means.data(), q.data(), flags.data(), s, nullptr);
    fp32_block_logits(tri.data(), q_means.data(), k_means.data(), flags.data(), s, nullptr);
    const std::vector<double> got = tri.download();
    for (int64_t h = 0; h < c.num_q_heads; ++h) {
      const double* head = got.data() + h * num_tri;
      int64_t num_bad = 0;
      if (query_aware[h] == 0) {
        for (int64_t i = 0; i < num_tri; ++i) num_bad += head[i] != kUntouched ? 1 : 0;
        EXPECT_EQ(num_bad, 0) << "head " << h << " is not query-aware but its logits changed";
        continue;
      }
      const Step8Logits want = step8_logits(in, c, h);
      double worst = 0.0;
      for (int64_t r = 0; r < nb; ++r) {
        for (int64_t col = 0; col <= r; ++col) {
          const double value = head[r * (r + 1) / 2 + col];
          const double err = std::abs(value - want.logit[r * nb + col]);
          const double bound = want.bound[r * nb + col];
          worst = std::max(worst, err / bound);
          if (!(err <= bound) && ++num_bad <= 3) {  // NaN fails
            ADD_FAILURE() << "head " << h << " logit (" << r << ", " << col << ") = " << value
                          << ", reference " << want.logit[r * nb + col] << ", bound " << bound;
          }
        }
      }
      EXPECT_EQ(num_bad, 0) << "head " << h << ": worst error / bound " << worst;
    }
  }
}

}  // namespace
}  // namespace moeforge::cuda
