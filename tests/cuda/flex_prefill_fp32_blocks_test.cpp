// Step 8's fp32 logits (cuda::fp32_q_block_means, then fp32_block_logits;
// cuda/flex_prefill_fp32_blocks.cu) against the reference's doubles within the bound of
// cuda/flex_prefill_fp32.h (testing::flex::step8_logits), on block sizes 64 and 128, GQA groups 1
// to 4, N not a multiple of the block, head_dim 40 to 256 and more than one 64 x 64 tile of blocks;
// their fp32 softmax (fp32_block_softmax) against the exact softmax within its bound rho_sm; heads
// that are not query-aware keep what tri held. The side stream's means kernels give the exact
// key means (flex::block_means' bits) and, like the logits, the same query means in grids of any
// size; null flags compute every head.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_stages.h"
#include "cuda/side_stream.h"
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

constexpr float kUntouched = -7.0f;  // what tri holds before the call

// The entries of got whose bits differ from want's (all of them where the sizes differ).
template <typename T>
int64_t bits_differ(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) return static_cast<int64_t>(std::max(got.size(), want.size()));
  int64_t differ = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    differ += std::memcmp(&got[i], &want[i], sizeof(T)) != 0 ? 1 : 0;
  }
  return differ;
}

const Case kCases[] = {
    {1000, 4, 4, 64, 64},   {1900, 4, 2, 128, 128}, {1500, 4, 1, 40, 64},
    {1300, 2, 1, 256, 128}, {9000, 4, 2, 128, 64},  {4500, 2, 2, 72, 64},
};

// A case on the device: its random inputs, search shape (gamma 0.9, tau 0.1), q and k, and the
// exact key means (flex::block_means, factor 1).
struct DeviceCase {
  testing::flex::Inputs in;
  flex::SearchShape s;
  DeviceBuffer<bf16> q, k;
  DeviceBuffer<double> k_means;
};

DeviceCase device_case(const Case& c, uint64_t seed, const char* who) {
  DeviceCase dc{make_inputs(c, seed), {}, {}, {}, {}};
  dc.s = flex::search_shape(dims_of(c), params_of(c, 0.9, 0.1), who);
  dc.q = to_device(to_bf16(dc.in.q));
  dc.k = to_device(to_bf16(dc.in.k));
  dc.k_means.resize(static_cast<size_t>(c.num_kv_heads * dc.s.num_blocks * c.head_dim));
  flex::block_means(dc.k_means.data(), dc.k.data(), c.num_kv_heads, 1.0, nullptr, dc.s, nullptr);
  return dc;
}

TEST(FlexPrefillFp32Blocks, LogitsWithinTheBoundOfTheReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 301;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const DeviceCase dc = device_case(c, seed++, "fp32 block logits test");
    const flex::SearchShape& s = dc.s;
    const int64_t nb = s.num_blocks, num_tri = nb * (nb + 1) / 2;
    std::vector<int32_t> query_aware(static_cast<size_t>(c.num_q_heads));
    for (int64_t h = 0; h < c.num_q_heads; ++h) query_aware[h] = h % 3 != 1 ? 1 : 0;
    DeviceBuffer<int32_t> flags = to_device(query_aware);
    DeviceBuffer<float> tri =
        to_device(std::vector<float>(static_cast<size_t>(c.num_q_heads * num_tri), kUntouched));
    DeviceBuffer<float> q_means(static_cast<size_t>(c.num_q_heads * s.num_blocks * c.head_dim));
    fp32_q_block_means(q_means.data(), dc.q.data(), flags.data(), s, nullptr, 0);
    fp32_block_logits(tri.data(), q_means.data(), dc.k_means.data(), flags.data(), s, nullptr, 0);
    const std::vector<float> got = tri.download();
    for (int64_t h = 0; h < c.num_q_heads; ++h) {
      const float* head = got.data() + h * num_tri;
      int64_t num_bad = 0;
      if (query_aware[h] == 0) {
        for (int64_t i = 0; i < num_tri; ++i) num_bad += head[i] != kUntouched ? 1 : 0;
        EXPECT_EQ(num_bad, 0) << "head " << h << " is not query-aware but its logits changed";
        continue;
      }
      const Step8Logits want = step8_logits(dc.in, c, h);
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

// fp32_block_softmax against the exact softmax (long double) of the logits it is given: within
// rho_sm of cuda/flex_prefill_fp32.h (2 (W 2^-24 + 2^-22) + (len + 1) 2^-53 for a row of len logits
// of span W) and the rounding to fp32, times 1.01 (first order), plus 2^-147 absolute where fp32
// holds an exponential below 2^-126 with less precision; rows of 1 to 625 logits of spans from
// 0.02 to 120 (exponentials that underflow fp32), rows of heads that are not query-aware kept.
TEST(FlexPrefillFp32Blocks, SoftmaxWithinItsBoundOfTheExactOne) {
  MF_REQUIRE_GPU();
  uint64_t seed = 501;
  for (const int64_t nb : {1, 16, 266, 625}) {
    for (const float half_span : {0.01f, 6.0f, 60.0f}) {
      SCOPED_TRACE("nb " + std::to_string(nb) + ", logits in +-" + std::to_string(half_span));
      const int64_t num_heads = 3, num_tri = nb * (nb + 1) / 2;
      flex::SearchShape s{};
      s.num_q_heads = num_heads;
      s.num_blocks = nb;
      const std::vector<float> logits = testing::random_uniform(
          static_cast<size_t>(num_heads * num_tri), seed++, -half_span, half_span);
      const std::vector<int32_t> query_aware = {1, 0, 1};
      DeviceBuffer<int32_t> flags = to_device(query_aware);
      DeviceBuffer<float> tri = to_device(logits);
      fp32_block_softmax(tri.data(), flags.data(), s, nullptr);
      const std::vector<float> got = tri.download();
      for (int64_t h = 0; h < num_heads; ++h) {
        int64_t num_bad = 0;
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t at = h * num_tri + r * (r + 1) / 2, len = r + 1;
          const float* x = logits.data() + at;
          const auto [lo, hi] = std::minmax_element(x, x + len);
          long double sum = 0.0L;
          for (int64_t col = 0; col < len; ++col)
            sum += std::exp(static_cast<long double>(x[col]) - *hi);
          const double rho = 1.01 * (2.0 * ((*hi - *lo) * 0x1.0p-24 + 0x1.0p-22) +
                                     (len + 1) * 0x1.0p-53 + 0x1.0p-24);
          for (int64_t col = 0; col < len; ++col) {
            const float value = got[at + col];
            if (query_aware[h] == 0) {
              num_bad += value != x[col] ? 1 : 0;
              continue;
            }
            const long double want = std::exp(static_cast<long double>(x[col]) - *hi) / sum;
            if (!(std::abs(value - want) <= rho * want + 0x1.0p-147L) && ++num_bad <= 3) {
              ADD_FAILURE() << "head " << h << " row " << r << " entry " << col << " = " << value
                            << ", exact " << static_cast<double>(want);
            }
          }
        }
        EXPECT_EQ(num_bad, 0) << "head " << h << (query_aware[h] == 0 ? " (not query-aware)" : "");
      }
    }
  }
}

// fp32_block_logits gives the same bits in grids of 1, 3 and the side stream's number of blocks of
// threads as in one of a block per tile, and for every head with query_aware null as with every
// flag set; so does fp32_block_softmax with query_aware null.
TEST(FlexPrefillFp32Blocks, LogitsInAnyGridAndForEveryHeadGiveTheSameBits) {
  MF_REQUIRE_GPU();
  uint64_t seed = 601;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const DeviceCase dc = device_case(c, seed++, "fp32 block logits grid test");
    const flex::SearchShape& s = dc.s;
    const int64_t nb = s.num_blocks;
    const size_t tri_size = static_cast<size_t>(c.num_q_heads * (nb * (nb + 1) / 2));
    DeviceBuffer<float> q_means(static_cast<size_t>(c.num_q_heads * nb * c.head_dim));
    fp32_q_block_means(q_means.data(), dc.q.data(), nullptr, s, nullptr, 0);
    DeviceBuffer<int32_t> all_set =
        to_device(std::vector<int32_t>(static_cast<size_t>(c.num_q_heads), 1));
    const auto probabilities = [&](const int32_t* query_aware, unsigned max_blocks) {
      DeviceBuffer<float> tri = to_device(std::vector<float>(tri_size, kUntouched));
      fp32_block_logits(tri.data(), q_means.data(), dc.k_means.data(), query_aware, s, nullptr,
                        max_blocks);
      std::vector<float> logits = tri.download();
      fp32_block_softmax(tri.data(), query_aware, s, nullptr);
      return std::make_pair(std::move(logits), tri.download());
    };
    const auto [want_logits, want_p] = probabilities(all_set.data(), 0);
    EXPECT_EQ(std::count(want_logits.begin(), want_logits.end(), kUntouched), 0);
    for (const unsigned max_blocks : {1u, 3u, side_stream_max_blocks()}) {
      SCOPED_TRACE("max_blocks " + std::to_string(max_blocks));
      const auto [got_logits, got_p] = probabilities(all_set.data(), max_blocks);
      EXPECT_EQ(bits_differ(got_logits, want_logits), 0);
      EXPECT_EQ(bits_differ(got_p, want_p), 0);
    }
    SCOPED_TRACE("query_aware null");
    const auto [every_logits, every_p] = probabilities(nullptr, side_stream_max_blocks());
    EXPECT_EQ(bits_differ(every_logits, want_logits), 0);
    EXPECT_EQ(bits_differ(every_p, want_p), 0);
  }
}

// fp32_key_block_means equals flex::block_means bit for bit, and both means kernels give the same
// bits in grids of 1, 3 and the side stream's number of blocks of threads as in unbounded ones;
// the query means of heads whose flag is 0 keep what the buffer held.
TEST(FlexPrefillFp32Blocks, SideMeansInAnyGridEqualTheExactOnes) {
  MF_REQUIRE_GPU();
  uint64_t seed = 401;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const DeviceCase dc = device_case(c, seed++, "side means test");
    const flex::SearchShape& s = dc.s;
    const int64_t nb = s.num_blocks;
    std::vector<int32_t> active(static_cast<size_t>(c.num_q_heads));
    for (int64_t h = 0; h < c.num_q_heads; ++h) active[h] = h % 2 == 0 ? 1 : 0;
    DeviceBuffer<int32_t> flags = to_device(active);
    const size_t k_size = static_cast<size_t>(c.num_kv_heads * nb * c.head_dim);
    const size_t q_size = static_cast<size_t>(c.num_q_heads * nb * c.head_dim);
    const std::vector<double> want_k = dc.k_means.download();
    const auto means = [&](unsigned max_blocks) {
      DeviceBuffer<double> k_means = to_device(std::vector<double>(k_size, kUntouched));
      DeviceBuffer<float> q_means = to_device(std::vector<float>(q_size, kUntouched));
      fp32_key_block_means(k_means.data(), dc.k.data(), s, nullptr, max_blocks);
      fp32_q_block_means(q_means.data(), dc.q.data(), flags.data(), s, nullptr, max_blocks);
      return std::make_pair(k_means.download(), q_means.download());
    };
    const auto [unbounded_k, want_q] = means(0);
    EXPECT_EQ(bits_differ(unbounded_k, want_k), 0);
    for (int64_t h = 0; h < c.num_q_heads; ++h) {
      const float* head = want_q.data() + h * nb * c.head_dim;
      const bool untouched =
          std::all_of(head, head + nb * c.head_dim, [](float x) { return x == kUntouched; });
      EXPECT_EQ(untouched, active[h] == 0) << "head " << h;
    }
    for (const unsigned max_blocks : {1u, 3u, side_stream_max_blocks()}) {
      SCOPED_TRACE("max_blocks " + std::to_string(max_blocks));
      const auto [got_k, got_q] = means(max_blocks);
      EXPECT_EQ(bits_differ(got_k, want_k), 0);
      EXPECT_EQ(bits_differ(got_q, want_q), 0);
    }
  }
}

}  // namespace
}  // namespace moeforge::cuda
