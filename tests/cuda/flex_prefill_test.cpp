// FlexPrefill pattern search on the GPU against ops/flex_prefill.h on the same bf16-rounded q and
// k: the CSR layout, the query-aware flags and the budgets exactly equal, the JS distances within
// fp64 noise, over shapes (N not a multiple of the block, block sizes 64 and 128, GQA groups 1 to
// 8, head dims 64 and 128) x gamma x tau, on inputs full of exact ties, at N = 20000 where every
// chunked sum and tile loop has several chunks and a partial last one, and at up to 1094 key
// blocks (the larger launch shapes of steps 6-8); each head's total against its CSR rows; the same
// errors or dense fallback on bad inputs (the errors for the fp32 search too); and, on the host,
// that the test inputs give non-trivial selections (so that the comparison is not vacuous).
#include "cuda/flex_prefill.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "flex_prefill_test_util.h"
#include "gpu_test_util.h"
#include "ops/flex_prefill.h"

namespace moeforge::cuda {
namespace {

using testing::expect_equal;
using testing::to_device;
using testing::flex::Case;
using testing::flex::describe;
using testing::flex::dims_of;
using testing::flex::expect_head_totals_match_layout;
using testing::flex::head_grid;
using testing::flex::Inputs;
using testing::flex::make_inputs;
using testing::flex::params_of;

// N not a multiple of the block size except 1024; GQA groups 1, 2, 3, 4 and 8; head dims 64 and
// 128; block sizes 64 and 128. No N with (N + 1) % 128 == 0: with gamma = 1 the step-2 coverage
// count is N or N + 1 by rounding alone, which changes a budget only at those N.
const Case kCases[] = {
    {1000, 8, 8, 64, 64},   {1900, 8, 4, 128, 128}, {700, 8, 2, 64, 64},
    {1024, 4, 1, 128, 128}, {3000, 8, 1, 64, 128},  {1000, 6, 2, 128, 64},
};
const double kGammas[] = {0.5, 0.9, 1.0};
// tau = 0: no head is query-aware; tau = 1: every head is (the JS distance is <= sqrt(ln 2)).
const double kTaus[] = {0.0, 0.1, 1.0};

// Flat index r * nb + c of the smallest entry of step 8's block-causal softmax of head h (the last
// one in the reference's order), recomputed here in double as ops/flex_prefill.h defines it.
int64_t smallest_block_prob(const Inputs& in, const Case& c, int64_t h) {
  const int64_t nb = (c.seq_len + c.block_size - 1) / c.block_size;
  const int64_t d = c.head_dim;
  const int64_t g = h / (c.num_q_heads / c.num_kv_heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const auto block_mean = [&](const std::vector<float>& x, int64_t heads, int64_t head, int64_t b) {
    std::vector<double> mean(d, 0.0);
    const int64_t end = std::min(c.seq_len, (b + 1) * c.block_size);
    for (int64_t n = b * c.block_size; n < end; ++n) {
      for (int64_t i = 0; i < d; ++i) mean[i] += x[(n * heads + head) * d + i];
    }
    for (double& v : mean) v /= static_cast<double>(end - b * c.block_size);
    return mean;
  };
  int64_t best = -1;
  double best_value = 2.0;
  for (int64_t r = 0; r < nb; ++r) {
    const std::vector<double> q_mean = block_mean(in.q, c.num_q_heads, h, r);
    std::vector<double> logits(r + 1);
    for (int64_t col = 0; col <= r; ++col) {
      const std::vector<double> k_mean = block_mean(in.k, c.num_kv_heads, g, col);
      logits[col] = 0.0;
      for (int64_t i = 0; i < d; ++i) logits[col] += scale * q_mean[i] * k_mean[i];
    }
    const double max_logit = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (double& v : logits) sum += (v = std::exp(v - max_logit));
    for (int64_t col = 0; col <= r; ++col) {
      if (logits[col] / sum <= best_value) {
        best_value = logits[col] / sum;
        best = r * nb + col;
      }
    }
  }
  return best;
}

// The inputs of SelectionEqualsReference (same seeds).
TEST(FlexPrefillCuda, TestInputsGiveNonTrivialSelections) {
  uint64_t seed = 11;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_inputs(c, seed++);
    const ops::FlexPrefillSelection sel = ops::flex_prefill_select<float>(
        in.q.data(), in.k.data(), dims_of(c), params_of(c, 0.9, 0.1));
    ASSERT_FALSE(sel.dense_fallback);
    int64_t num_query_aware = 0;
    for (const ops::FlexPrefillHeadStats& stats : sel.head_stats) {
      num_query_aware += stats.query_aware ? 1 : 0;
      EXPECT_LT(stats.density, 1.0);
      // Far from tau, so that the flag cannot depend on rounding.
      EXPECT_GT(std::abs(stats.js_distance - 0.1), 1e-3);
    }
    EXPECT_GT(num_query_aware, 0);
    EXPECT_LT(num_query_aware, c.num_q_heads);
  }
}

// Runs the GPU search on in and expects the reference's selection: exactly, except for gamma = 1,
// where step 8 keeps the last (smallest) block probability iff the sum of all the head's block
// probabilities rounds to <= nb, a decision that an ulp of exp can flip. The sets must agree
// everywhere else then, and exactly for heads that are not query-aware.
void expect_reference_selection(const Inputs& in, const Case& c,
                                const ops::FlexPrefillParams& params) {
  const ops::FlexPrefillSelection ref =
      ops::flex_prefill_select<float>(in.q.data(), in.k.data(), dims_of(c), params);
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  FlexPrefillDeviceSelection device_sel;
  flex_prefill_select(device_sel, q.data(), k.data(), dims_of(c), params, nullptr);
  const ops::FlexPrefillSelection got = download_selection(device_sel);
  ops::check_block_sparse_layout(got.layout, c.num_q_heads, c.seq_len, "GPU selection");
  expect_head_totals_match_layout(got);

  ASSERT_EQ(got.dense_fallback, ref.dense_fallback);
  ASSERT_EQ(got.layout.num_blocks, ref.layout.num_blocks);
  ASSERT_EQ(got.head_stats.size(), ref.head_stats.size());
  std::vector<int32_t> got_flags, ref_flags;
  std::vector<int64_t> got_budgets, ref_budgets;
  for (size_t h = 0; h < ref.head_stats.size(); ++h) {
    got_flags.push_back(got.head_stats[h].query_aware ? 1 : 0);
    ref_flags.push_back(ref.head_stats[h].query_aware ? 1 : 0);
    got_budgets.push_back(got.head_stats[h].num_vertical_blocks);
    got_budgets.push_back(got.head_stats[h].num_slash_blocks);
    ref_budgets.push_back(ref.head_stats[h].num_vertical_blocks);
    ref_budgets.push_back(ref.head_stats[h].num_slash_blocks);
    EXPECT_NEAR(got.head_stats[h].js_distance, ref.head_stats[h].js_distance, 1e-12)
        << "head " << h;
  }
  expect_equal("query_aware", got_flags, ref_flags);
  expect_equal("budgets (vertical, slash per head)", got_budgets, ref_budgets);

  if (params.gamma < 1.0) {
    expect_equal("row_offsets", got.layout.row_offsets, ref.layout.row_offsets);
    expect_equal("col_idx", got.layout.col_idx, ref.layout.col_idx);
    return;
  }
  const int64_t nb = ref.layout.num_blocks;
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    const std::vector<char> got_grid = head_grid(got.layout, h);
    const std::vector<char> ref_grid = head_grid(ref.layout, h);
    if (!ref.head_stats[h].query_aware) {
      expect_equal("blocks of head " + std::to_string(h), got_grid, ref_grid);
      continue;
    }
    const int64_t knife_edge = smallest_block_prob(in, c, h);
    for (int64_t flat = 0; flat < nb * nb; ++flat) {
      if (flat == knife_edge) continue;
      EXPECT_EQ(got_grid[flat], ref_grid[flat])
          << "head " << h << " block (" << flat / nb << ", " << flat % nb << ")";
    }
  }
}

TEST(FlexPrefillCuda, SelectionEqualsReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 11;
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, seed);
    for (double gamma : kGammas) {
      for (double tau : kTaus) {
        SCOPED_TRACE(describe(c) + " gamma=" + std::to_string(gamma) +
                     " tau=" + std::to_string(tau));
        expect_reference_selection(in, c, params_of(c, gamma, tau));
      }
    }
    ++seed;
  }
}

// Query heads per KV head 1 to 8 on one shape.
TEST(FlexPrefillCuda, EveryGroupSizeEqualsReference) {
  MF_REQUIRE_GPU();
  for (int64_t group = 1; group <= 8; ++group) {
    const Case c{1500, 2 * group, 2, 64, 64};
    SCOPED_TRACE(describe(c));
    expect_reference_selection(make_inputs(c, 20 + group), c, params_of(c, 0.9, 0.1));
  }
}

// Keys that repeat with period 8 (k[n] = k[n % 8]): the attention of each row repeats over the
// keys, so vertical and slash values, the block scores of the full blocks and the block-level
// probabilities of step 8 tie exactly, and every sort leans on the tie rule. All-zero keys make
// every row uniform (everything ties).
TEST(FlexPrefillCuda, TiedScoresEqualReference) {
  MF_REQUIRE_GPU();
  const Case cases[] = {{1000, 4, 2, 64, 64}, {2000, 4, 1, 128, 128}};
  for (const Case& c : cases) {
    Inputs periodic = make_inputs(c, 31);
    const int64_t row = c.num_kv_heads * c.head_dim;
    for (int64_t n = 8; n < c.seq_len; ++n) {
      std::copy_n(periodic.k.begin() + (n % 8) * row, row, periodic.k.begin() + n * row);
    }
    Inputs zero_keys = periodic;
    std::fill(zero_keys.k.begin(), zero_keys.k.end(), 0.0f);
    for (double gamma : {0.5, 0.9}) {
      for (double tau : {0.0, 1.0}) {
        SCOPED_TRACE(describe(c) + " gamma=" + std::to_string(gamma) +
                     " tau=" + std::to_string(tau));
        expect_reference_selection(periodic, c, params_of(c, gamma, tau));
        expect_reference_selection(zero_keys, c, params_of(c, gamma, tau));
      }
    }
  }
}

// The reference's selection for each case, gamma 0.9, with no query-aware head (tau 0) and with
// every head query-aware (tau 1).
void expect_reference_without_and_with_step8(std::initializer_list<Case> cases, uint64_t seed) {
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c, seed);
    for (double tau : {0.0, 1.0}) {
      SCOPED_TRACE(describe(c) + " tau=" + std::to_string(tau));
      expect_reference_selection(in, c, params_of(c, 0.9, tau));
    }
  }
}

// N = 20000: 79 softmax and coverage chunks of step 1-2 (the last one of 32 keys), 313 or 157 key
// blocks (a step-8 triangle of 192 or 49 chunks, the last one partial), several logits tiles with
// a partial last one.
TEST(FlexPrefillCuda, LongInputEqualsReference) {
  MF_REQUIRE_GPU();
  expect_reference_without_and_with_step8({{20000, 2, 1, 64, 64}, {20000, 2, 1, 128, 128}}, 41);
}

// Block size 64 at N = 50000 and 70000: 782 and 1094 key blocks, so steps 6-7 sort 4 and 8 scores
// a thread and step 8's row softmax runs 7 and 5 warps a block (the shapes the shorter inputs
// do not reach).
TEST(FlexPrefillCuda, ManyBlocksEqualReference) {
  MF_REQUIRE_GPU();
  expect_reference_without_and_with_step8({{50000, 2, 1, 64, 64}, {70000, 2, 1, 64, 64}}, 43);
}

// Head dims that are not a multiple of 8 (the exact search takes any head_dim; the fast one needs
// multiples of 8).
TEST(FlexPrefillCuda, OddHeadDimsEqualReference) {
  MF_REQUIRE_GPU();
  expect_reference_without_and_with_step8({{1000, 4, 2, 36, 64}, {1300, 2, 1, 20, 128}}, 47);
}

TEST(FlexPrefillCuda, ShortInputsFallBackToDenseAsTheReference) {
  MF_REQUIRE_GPU();
  // N below one block, between one and two blocks, and within min_budget.
  const Case cases[] = {{50, 4, 2, 64, 64}, {200, 4, 2, 64, 128}, {900, 2, 1, 128, 64}};
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_inputs(c, 3);
    ops::FlexPrefillParams params = params_of(c, 0.9, 0.1);
    params.min_budget = 1024;
    const ops::FlexPrefillSelection ref =
        ops::flex_prefill_select<float>(in.q.data(), in.k.data(), dims_of(c), params);
    ASSERT_TRUE(ref.dense_fallback);
    DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
    FlexPrefillDeviceSelection device_sel;
    flex_prefill_select(device_sel, q.data(), k.data(), dims_of(c), params, nullptr);
    const ops::FlexPrefillSelection got = download_selection(device_sel);
    EXPECT_TRUE(got.dense_fallback);
    expect_equal("row_offsets", got.layout.row_offsets, ref.layout.row_offsets);
    expect_equal("col_idx", got.layout.col_idx, ref.layout.col_idx);
    expect_head_totals_match_layout(got);
    for (const ops::FlexPrefillHeadStats& stats : got.head_stats) {
      EXPECT_FALSE(stats.query_aware);
      EXPECT_TRUE(std::isnan(stats.js_distance));
      EXPECT_EQ(stats.density, 1.0);
    }
  }
}

// The message of the moeforge::Error that f throws ("" if none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Argument checks run on the host before any device work, so these run without a GPU; the fp32
// search gives the exact search's errors.
TEST(FlexPrefillCuda, BadInputsGiveTheReferenceErrors) {
  const Case c{1000, 4, 2, 64, 64};
  const std::vector<float> q(c.seq_len * c.num_q_heads * 512, 0.0f);
  const std::vector<float> k(c.seq_len * c.num_kv_heads * 512, 0.0f);
  FlexPrefillDeviceSelection out;
  for (const ops::FlexSearch search : {ops::FlexSearch::kExact, ops::FlexSearch::kFp32}) {
    SCOPED_TRACE(ops::flex_search_name(search));
    const auto params = [&](const Case& shape, double gamma) {
      ops::FlexPrefillParams p = params_of(shape, gamma, 0.1);
      p.search = search;
      return p;
    };
    const auto both = [&](const ops::SparseAttentionDims& dims, const ops::FlexPrefillParams& p) {
      const std::string ref =
          error_of([&] { ops::flex_prefill_select<float>(q.data(), k.data(), dims, p); });
      const std::string got =
          error_of([&] { flex_prefill_select(out, nullptr, nullptr, dims, p, nullptr); });
      return std::pair<std::string, std::string>(ref, got);
    };
    for (double gamma : {0.0, -0.5, 1.5}) {
      const auto [ref, got] = both(dims_of(c), params(c, gamma));
      EXPECT_NE(ref.find("gamma must be in (0, 1]"), std::string::npos) << ref;
      EXPECT_NE(got.find("gamma must be in (0, 1]"), std::string::npos) << got;
    }
    ops::FlexPrefillParams bad_block = params(c, 0.9);
    bad_block.block_size = 96;
    const auto [ref_block, got_block] = both(dims_of(c), bad_block);
    EXPECT_NE(got_block.find("block_size must be 64 or 128, got 96"), std::string::npos);
    EXPECT_NE(ref_block.find("block_size must be 64 or 128, got 96"), std::string::npos);
    const auto [ref_len, got_len] = both({0, 4, 2, 64}, params(c, 0.9));
    EXPECT_NE(ref_len.find("seq_len must be >= 1"), std::string::npos) << ref_len;
    EXPECT_NE(got_len.find("seq_len must be >= 1"), std::string::npos) << got_len;
    const auto [ref_gqa, got_gqa] = both({1000, 4, 3, 64}, params(c, 0.9));
    EXPECT_NE(ref_gqa.find("not divisible"), std::string::npos) << ref_gqa;
    EXPECT_NE(got_gqa.find("not divisible"), std::string::npos) << got_gqa;
    // Limits of the GPU version only (the reference accepts these).
    EXPECT_NE(
        error_of([&] {
          flex_prefill_select(out, nullptr, nullptr, {1000, 4, 2, 512}, params(c, 0.9), nullptr);
        }).find("head_dim must be in [1, 256], got 512"),
        std::string::npos);
    EXPECT_NE(
        error_of([&] {
          flex_prefill_select(out, nullptr, nullptr, {1000, 1026, 2, 64}, params(c, 0.9), nullptr);
        }).find("num_q_heads must be <= 1024, got 1026"),
        std::string::npos);
    EXPECT_NE(error_of([&] {
                flex_prefill_select(out, nullptr, nullptr, {2049 * 128, 4, 2, 64},
                                    params({0, 0, 0, 0, 128}, 0.9), nullptr);
              }).find("more than the 2048 supported"),
              std::string::npos);
  }
  // Limits of the fp32 search only (checked before any device query).
  ops::FlexPrefillParams fp32 = params_of(c, 0.9, 0.1);
  fp32.search = ops::FlexSearch::kFp32;
  EXPECT_NE(error_of([&] {
              flex_prefill_select(out, nullptr, nullptr, {1000, 4, 2, 36}, fp32, nullptr);
            }).find("head_dim must be a multiple of 8, got 36"),
            std::string::npos);
  const bf16* misaligned = reinterpret_cast<const bf16*>(uintptr_t{2});
  EXPECT_NE(error_of([&] {
              flex_prefill_select(out, misaligned, nullptr, dims_of(c), fp32, nullptr);
            }).find("q and k must be 16-byte aligned"),
            std::string::npos);
}

}  // namespace
}  // namespace moeforge::cuda
