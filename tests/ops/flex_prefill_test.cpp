// Tests of ops::flex_prefill_select: the dense fallback (and its equality with dense attention),
// parameter errors, layout invariants, budgets, the JS distance and flex_prefill_head_scores
// against quantities recomputed from dense attention probabilities, step 8's block probabilities
// (flex_prefill_block_probabilities) against their definition, hand-derived block sets (a
// concentrated key block, a query-aware head, the tie rule), and the chunked summation order (sums,
// coverage prefixes, and a selection that the plain sequential order would change).
#include "ops/flex_prefill.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "ops/attention.h"
#include "ops/block_sparse_attention.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::random_vector;

std::vector<float> to_float(const std::vector<double>& x) {
  return std::vector<float>(x.begin(), x.end());
}

int64_t num_blocks_of(int64_t seq_len, int64_t block_size) {
  return (seq_len + block_size - 1) / block_size;
}

// The selected blocks of one head as a dense [nb, nb] grid.
std::vector<char> head_grid(const BlockSparseLayout& layout, int64_t head) {
  const int64_t nb = layout.num_blocks;
  std::vector<char> grid(nb * nb, 0);
  for (int64_t r = 0; r < nb; ++r) {
    for (int64_t e = layout.row_offsets[head * nb + r]; e < layout.row_offsets[head * nb + r + 1];
         ++e) {
      grid[r * nb + layout.col_idx[e]] = 1;
    }
  }
  return grid;
}

// Vertical columns `cols` and diagonal offsets `offsets` expanded over the causal grid (step 7).
std::vector<char> vertical_slash_grid(int64_t nb, const std::vector<int64_t>& cols,
                                      const std::vector<int64_t>& offsets) {
  std::vector<char> grid(nb * nb, 0);
  for (int64_t c : cols) {
    for (int64_t r = c; r < nb; ++r) grid[r * nb + c] = 1;
  }
  for (int64_t s : offsets) {
    for (int64_t r = s; r < nb; ++r) grid[r * nb + r - s] = 1;
  }
  return grid;
}

void expect_same_selection(const FlexPrefillSelection& a, const FlexPrefillSelection& b) {
  EXPECT_EQ(a.dense_fallback, b.dense_fallback);
  EXPECT_EQ(a.layout.row_offsets, b.layout.row_offsets);
  EXPECT_EQ(a.layout.col_idx, b.layout.col_idx);
  ASSERT_EQ(a.head_stats.size(), b.head_stats.size());
  for (size_t h = 0; h < a.head_stats.size(); ++h) {
    EXPECT_EQ(a.head_stats[h].query_aware, b.head_stats[h].query_aware);
    EXPECT_EQ(a.head_stats[h].js_distance, b.head_stats[h].js_distance);
    EXPECT_EQ(a.head_stats[h].num_vertical_blocks, b.head_stats[h].num_vertical_blocks);
    EXPECT_EQ(a.head_stats[h].num_slash_blocks, b.head_stats[h].num_slash_blocks);
    EXPECT_EQ(a.head_stats[h].density, b.head_stats[h].density);
  }
}

// Causality, sorted rows and diagonal (check_block_sparse_layout), the first column in every row,
// and stats consistent with the CSR.
void check_invariants(const FlexPrefillSelection& sel, const SparseAttentionDims& dims) {
  ASSERT_NO_THROW(
      check_block_sparse_layout(sel.layout, dims.num_q_heads, dims.seq_len, "selection"));
  const int64_t nb = sel.layout.num_blocks;
  ASSERT_EQ(static_cast<int64_t>(sel.head_stats.size()), dims.num_q_heads);
  for (int64_t h = 0; h < dims.num_q_heads; ++h) {
    int64_t num_selected = 0;
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t begin = sel.layout.row_offsets[h * nb + r];
      const int64_t end = sel.layout.row_offsets[h * nb + r + 1];
      EXPECT_EQ(sel.layout.col_idx[begin], 0) << "head " << h << " row " << r;
      num_selected += end - begin;
    }
    const FlexPrefillHeadStats& stats = sel.head_stats[h];
    EXPECT_EQ(stats.num_selected_blocks, num_selected) << "head " << h;
    EXPECT_DOUBLE_EQ(stats.density, static_cast<double>(num_selected) / (nb * (nb + 1) / 2));
    EXPECT_GT(stats.density, 0.0);
    EXPECT_LE(stats.density, 1.0);
  }
}

TEST(FlexPrefill, GammaOneWithMinBudgetAtLeastNIsDenseAttention) {
  const SparseAttentionDims dims{300, 4, 2, 64};
  const FlexPrefillParams params{1.0, 0.1, 300, 0, 64};
  const int64_t q_size = dims.seq_len * dims.num_q_heads * dims.head_dim;
  const int64_t kv_size = dims.seq_len * dims.num_kv_heads * dims.head_dim;
  const std::vector<double> q = random_vector(q_size, 1, 2.0);
  const std::vector<double> k = random_vector(kv_size, 2, 2.0);
  const std::vector<double> v = random_vector(kv_size, 3);
  const AttentionDims dense_dims{
      1, dims.seq_len, dims.seq_len, dims.num_q_heads, dims.num_kv_heads, dims.head_dim};

  auto check = [&](auto zero, double tol) {
    using T = decltype(zero);
    const std::vector<T> qt(q.begin(), q.end());
    const std::vector<T> kt(k.begin(), k.end());
    const std::vector<T> vt(v.begin(), v.end());
    const FlexPrefillSelection sel = flex_prefill_select(qt.data(), kt.data(), dims, params);
    EXPECT_TRUE(sel.dense_fallback);
    const BlockSparseLayout dense = dense_causal_layout(dims.num_q_heads, dims.seq_len, 64);
    EXPECT_EQ(sel.layout.row_offsets, dense.row_offsets);
    EXPECT_EQ(sel.layout.col_idx, dense.col_idx);
    for (const FlexPrefillHeadStats& stats : sel.head_stats) EXPECT_EQ(stats.density, 1.0);

    std::vector<T> sparse_out(q_size);
    std::vector<T> dense_out(q_size);
    block_sparse_attention_forward(sparse_out.data(), static_cast<T*>(nullptr), qt.data(),
                                   kt.data(), vt.data(), sel.layout, dims);
    attention_forward(dense_out.data(), static_cast<T*>(nullptr), qt.data(), kt.data(), vt.data(),
                      dense_dims);
    expect_close(std::vector<double>(sparse_out.begin(), sparse_out.end()),
                 std::vector<double>(dense_out.begin(), dense_out.end()), tol, tol, "out");
  };
  check(0.0f, 2e-6);
  check(0.0, 1e-12);
}

TEST(FlexPrefill, ShortInputsFallBackToDense) {
  const std::vector<double> qk = random_vector(600 * 2 * 64, 4);
  auto fallback = [&](int64_t seq_len, int64_t min_budget, int64_t block_size) {
    const SparseAttentionDims dims{seq_len, 2, 2, 64};
    const FlexPrefillParams params{0.9, 0.1, min_budget, 0, block_size};
    return flex_prefill_select(qk.data(), qk.data(), dims, params).dense_fallback;
  };
  EXPECT_TRUE(fallback(1, 1, 64));     // decode-like: one query
  EXPECT_TRUE(fallback(50, 1, 64));    // below one block
  EXPECT_TRUE(fallback(128, 1, 64));   // N == 2 * bs
  EXPECT_FALSE(fallback(129, 1, 64));  // N > 2 * bs
  EXPECT_TRUE(fallback(256, 1, 128));
  EXPECT_FALSE(fallback(257, 1, 128));
  EXPECT_TRUE(fallback(256, 200, 64));   // minB = ceil(200 / 64) = 4: N == minB * bs
  EXPECT_FALSE(fallback(257, 200, 64));  // N > minB * bs
  EXPECT_TRUE(fallback(600, 1000, 64));  // min_budget > N

  const SparseAttentionDims dims{50, 2, 2, 64};
  const FlexPrefillSelection sel =
      flex_prefill_select(qk.data(), qk.data(), dims, FlexPrefillParams{0.9, 0.1, 1, 0, 64});
  EXPECT_EQ(sel.layout.num_blocks, 1);
  EXPECT_EQ(sel.layout.col_idx, std::vector<int32_t>({0, 0}));
  EXPECT_TRUE(std::isnan(sel.head_stats[0].js_distance));
  EXPECT_FALSE(sel.head_stats[0].query_aware);
}

TEST(FlexPrefill, RejectsBadParamsAndDims) {
  const std::vector<float> qk = to_float(random_vector(300 * 2 * 64, 5));
  auto select = [&](FlexPrefillParams params, int64_t seq_len = 300, int64_t head_dim = 64) {
    const SparseAttentionDims dims{seq_len, 2, 2, head_dim};
    return flex_prefill_select(qk.data(), qk.data(), dims, params);
  };
  auto expect_error = [&](const std::function<void()>& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "expected an error mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const FlexPrefillParams good{0.9, 0.1, 1, 0, 64};
  EXPECT_NO_THROW(select(good));
  expect_error([&] { select({0.0, 0.1, 1, 0, 64}); }, "gamma");
  expect_error([&] { select({1.5, 0.1, 1, 0, 64}); }, "gamma");
  expect_error([&] { select({-0.1, 0.1, 1, 0, 64}); }, "gamma");
  expect_error([&] { select({0.9, 0.1, 1, 0, 100}); }, "block_size");
  expect_error([&] { select({0.9, -1.0, 1, 0, 64}); }, "tau");
  expect_error([&] { select({0.9, 0.1, 0, 0, 64}); }, "min_budget");
  expect_error([&] { select({0.9, 0.1, 256, 128, 64}); }, "max_budget");
  expect_error([&] { select(good, 0); }, "seq_len");
  expect_error([&] { select(good, 300, 0); }, "head_dim");
  expect_error([&] { select({std::nan(""), 0.1, 1, 0, 64}); }, "gamma");
  FlexPrefillParams bad_search = good;
  bad_search.search = static_cast<FlexSearch>(7);
  expect_error([&] { select(bad_search); }, "search must be FlexSearch::kExact or kFp32, got 7");
  expect_error(
      [&] {
        flex_prefill_head_scores(qk.data(), qk.data(), {300, 2, 2, 64}, good, 2);
      },
      "head must be in [0, 2), got 2");
  expect_error(
      [&] {
        flex_prefill_head_scores(qk.data(), qk.data(), {50, 2, 2, 64}, good, 0);
      },
      "seq_len must be >= block_size=64, got 50");

  std::vector<float> bad_q = qk;
  bad_q[77] = NAN;
  expect_error(
      [&] {
        flex_prefill_select(bad_q.data(), qk.data(), SparseAttentionDims{300, 2, 2, 64}, good);
      },
      "non-finite");
}

TEST(FlexPrefill, RandomInputsGiveValidDeterministicLayouts) {
  struct Case {
    SparseAttentionDims dims;
    FlexPrefillParams params;
  };
  const std::vector<Case> cases = {
      {{300, 4, 2, 64}, {0.9, 0.1, 1, 0, 64}},
      {{333, 8, 1, 128}, {0.95, 0.1, 1, 0, 64}},
      {{333, 3, 3, 64}, {0.9, 1.0, 64, 0, 64}},  // large tau: query-aware heads
      {{700, 2, 1, 64}, {0.9, 0.0, 1, 256, 128}},
  };
  uint64_t seed = 40;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "N" << c.dims.seq_len);
    const std::vector<float> q =
        to_float(random_vector(c.dims.seq_len * c.dims.num_q_heads * c.dims.head_dim, seed++, 3.0));
    const std::vector<float> k = to_float(
        random_vector(c.dims.seq_len * c.dims.num_kv_heads * c.dims.head_dim, seed++, 3.0));
    const FlexPrefillSelection first = flex_prefill_select(q.data(), k.data(), c.dims, c.params);
    EXPECT_FALSE(first.dense_fallback);
    check_invariants(first, c.dims);
    expect_same_selection(first, flex_prefill_select(q.data(), k.data(), c.dims, c.params));
    // The reference is the exact search whatever the device's search precision.
    FlexPrefillParams fp32 = c.params;
    fp32.search = FlexSearch::kFp32;
    expect_same_selection(first, flex_prefill_select(q.data(), k.data(), c.dims, fp32));
    for (const FlexPrefillHeadStats& stats : first.head_stats) {
      EXPECT_EQ(stats.query_aware, stats.js_distance < c.params.tau);
      if (stats.query_aware) {
        const int64_t bs = c.params.block_size;
        EXPECT_EQ(stats.num_vertical_blocks, (c.params.min_budget + bs - 1) / bs);
        EXPECT_EQ(stats.num_slash_blocks, (c.params.min_budget + bs - 1) / bs);
      }
    }
  }
}

// Recomputes, from dense attention probabilities (ops::attention_forward), the vertical and slash
// distributions of the last block, their coverage budgets and the JS distance of step 4, and
// compares with the selection's stats for several min/max budgets.
TEST(FlexPrefill, BudgetsAndJsDistanceMatchDenseProbabilities) {
  const SparseAttentionDims dims{600, 4, 2, 64};
  const int64_t n = dims.seq_len;
  const int64_t bs = 64;
  const int64_t nb = num_blocks_of(n, bs);
  const int64_t d = dims.head_dim;
  const double gamma = 0.9;
  const std::vector<double> q = random_vector(n * dims.num_q_heads * d, 50, 2.0);
  const std::vector<double> k = random_vector(n * dims.num_kv_heads * d, 51, 2.0);
  std::vector<double> out(q.size());
  std::vector<double> probs(dims.num_q_heads * n * n);  // [Hq, N, N]
  attention_forward(out.data(), probs.data(), q.data(), k.data(), k.data(),
                    AttentionDims{1, n, n, dims.num_q_heads, dims.num_kv_heads, d});

  auto coverage_blocks = [&](std::vector<double> x) {
    std::sort(x.begin(), x.end(), std::greater<>());
    int64_t count = 0;
    double sum = 0.0;
    for (double value : x) {
      sum += value;
      if (sum <= gamma) ++count;
    }
    return (count + 1) / 128 + 1;
  };
  std::vector<int64_t> natural_v(dims.num_q_heads);
  std::vector<int64_t> natural_s(dims.num_q_heads);
  std::vector<double> expected_js(dims.num_q_heads);
  for (int64_t h = 0; h < dims.num_q_heads; ++h) {
    const int64_t g = h / (dims.num_q_heads / dims.num_kv_heads);
    std::vector<double> vertical(n, 0.0);
    std::vector<double> slash(n, 0.0);
    for (int64_t r = 0; r < bs; ++r) {
      const double* row = probs.data() + (h * n + n - bs + r) * n;
      for (int64_t i = 0; i < n; ++i) {
        vertical[i] += row[i] / bs;
        const int64_t j = i + r - (bs - 1);
        if (j >= 0) slash[i] += row[j] / bs;
      }
    }
    natural_v[h] = coverage_blocks(vertical);
    natural_s[h] = coverage_blocks(slash);
    const FlexPrefillHeadScores scores = flex_prefill_head_scores(
        q.data(), k.data(), dims, FlexPrefillParams{gamma, 0.0, 1, 0, bs}, h);
    expect_close(scores.vertical, vertical, 1e-12, 1e-12, "vertical of head " + std::to_string(h));
    expect_close(scores.slash, slash, 1e-12, 1e-12, "slash of head " + std::to_string(h));
    ASSERT_EQ(scores.vertical_blk.size(), static_cast<size_t>(nb));
    ASSERT_EQ(scores.slash_blk.size(), static_cast<size_t>(nb));
    for (int64_t c = 0; c < nb; ++c) {
      double v_blk = 0.0, s_blk = 0.0;
      for (int64_t j = c * bs; j < std::min(n, (c + 1) * bs); ++j) {
        v_blk += scores.vertical[j];
        s_blk += scores.slash[j];
      }
      EXPECT_EQ(scores.vertical_blk[c], v_blk) << "head " << h << " block " << c;
      EXPECT_EQ(scores.slash_blk[c], s_blk) << "head " << h << " block " << c;
    }
    // abar: softmax over blocks of (mean of the scaled last-block queries) . (block-mean keys).
    std::vector<double> abar(nb, 0.0);
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t len = std::min(bs, n - c * bs);
      for (int64_t r = n - bs; r < n; ++r) {
        for (int64_t j = c * bs; j < c * bs + len; ++j) {
          for (int64_t x = 0; x < d; ++x) {
            abar[c] += q[(r * dims.num_q_heads + h) * d + x] *
                       k[(j * dims.num_kv_heads + g) * d + x] /
                       (bs * len * std::sqrt(static_cast<double>(d)));
          }
        }
      }
    }
    double z = 0.0;
    for (double& a : abar) z += (a = std::exp(a));
    double js = 0.0;
    for (int64_t c = 0; c < nb; ++c) {
      double vblk = 0.0;
      for (int64_t j = c * bs; j < std::min(n, (c + 1) * bs); ++j) vblk += vertical[j];
      const double a = abar[c] / z;
      const double m = (a + vblk) / 2;
      js += 0.5 * a * std::log(a / m) + 0.5 * vblk * std::log(vblk / m);
    }
    expected_js[h] = std::sqrt(js);
    EXPECT_NEAR(scores.js_distance, expected_js[h], 1e-10) << "head " << h;
  }
  // The random attention is spread out: the natural budgets are several blocks.
  EXPECT_GE(natural_v[0], 3);

  for (const auto& [min_budget, max_budget] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 0}, {1, 128}, {1, 130}, {257, 0}, {1, 100000}}) {
    SCOPED_TRACE("min_budget " + std::to_string(min_budget) + " max_budget " +
                 std::to_string(max_budget));
    const FlexPrefillParams params{gamma, 0.0, min_budget, max_budget, bs};
    const FlexPrefillSelection sel = flex_prefill_select(q.data(), k.data(), dims, params);
    check_invariants(sel, dims);
    const int64_t min_blocks = (min_budget + bs - 1) / bs;
    const int64_t max_blocks = max_budget > 0 ? std::min((max_budget + bs - 1) / bs, nb) : nb;
    for (int64_t h = 0; h < dims.num_q_heads; ++h) {
      const FlexPrefillHeadStats& stats = sel.head_stats[h];
      EXPECT_FALSE(stats.query_aware);
      EXPECT_NEAR(stats.js_distance, expected_js[h], 1e-10);
      // The scores are the selection's own doubles.
      EXPECT_EQ(stats.js_distance,
                flex_prefill_head_scores(q.data(), k.data(), dims, params, h).js_distance);
      EXPECT_EQ(stats.num_vertical_blocks, std::clamp(natural_v[h], min_blocks, max_blocks));
      EXPECT_EQ(stats.num_slash_blocks, std::clamp(natural_s[h], min_blocks, max_blocks));
    }
  }
  // Spot checks of the clamping arithmetic for head 0.
  auto nv = [&](int64_t min_budget, int64_t max_budget) {
    const FlexPrefillParams params{gamma, 0.0, min_budget, max_budget, bs};
    return flex_prefill_select(q.data(), k.data(), dims, params).head_stats[0].num_vertical_blocks;
  };
  EXPECT_EQ(nv(1, 128), 2);                 // maxB = 128 / 64
  EXPECT_EQ(nv(1, 129), 3);                 // maxB = ceil(129 / 64)
  EXPECT_EQ(nv(513, 0), 9);                 // minB = ceil(513 / 64)
  EXPECT_EQ(nv(1, 1 << 20), natural_v[0]);  // maxB capped at nb
}

// All queries near u = 8 e0; the keys of block 3 alternate +8 e0 / -8 e0 (plus noise), the other
// keys are noise. Attention piles onto block 3 (vertical), while the block mean of its keys is
// about 0, so abar is near uniform: the head is not query-aware and with two vertical blocks the
// selection is column 0 and column 3.
TEST(FlexPrefill, ConcentratedKeyBlockIsSelectedAsColumn) {
  const SparseAttentionDims dims{500, 4, 2, 64};
  const int64_t bs = 64;
  const int64_t target = 3;
  std::vector<double> q = random_vector(dims.seq_len * dims.num_q_heads * dims.head_dim, 60, 0.3);
  std::vector<double> k = random_vector(dims.seq_len * dims.num_kv_heads * dims.head_dim, 61, 0.3);
  for (int64_t i = 0; i < dims.seq_len; ++i) {
    for (int64_t h = 0; h < dims.num_q_heads; ++h)
      q[(i * dims.num_q_heads + h) * dims.head_dim] = 8;
  }
  for (int64_t j = target * bs; j < (target + 1) * bs; ++j) {
    for (int64_t g = 0; g < dims.num_kv_heads; ++g) {
      k[(j * dims.num_kv_heads + g) * dims.head_dim] = (j % 2 == 0) ? 8.0 : -8.0;
    }
  }
  const FlexPrefillParams params{0.9, 0.1, 2 * bs, 0, bs};
  const FlexPrefillSelection sel = flex_prefill_select(q.data(), k.data(), dims, params);
  ASSERT_FALSE(sel.dense_fallback);
  check_invariants(sel, dims);
  const int64_t nb = sel.layout.num_blocks;
  for (int64_t h = 0; h < dims.num_q_heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    EXPECT_FALSE(sel.head_stats[h].query_aware);
    EXPECT_GT(sel.head_stats[h].js_distance, 0.3);
    EXPECT_EQ(sel.head_stats[h].num_vertical_blocks, 2);
    const std::vector<char> grid = head_grid(sel.layout, h);
    for (int64_t r = target; r < nb; ++r) EXPECT_EQ(grid[r * nb + target], 1) << "row " << r;
  }
}

// Step 8's block probabilities against their definition recomputed here: block means of the
// real rows (the last block partial), Qbar scaled by 1 / sqrt(D), a causal softmax per row; GQA
// (query head 3 reads KV head 1).
TEST(FlexPrefill, BlockProbabilitiesMatchTheirDefinition) {
  const SparseAttentionDims dims{600, 4, 2, 32};
  const int64_t n = dims.seq_len, d = dims.head_dim, bs = 128, head = 3, kv_head = 1;
  const int64_t nb = num_blocks_of(n, bs);
  const std::vector<double> q = random_vector(n * dims.num_q_heads * d, 80, 2.0);
  const std::vector<double> k = random_vector(n * dims.num_kv_heads * d, 81, 2.0);
  const auto means = [&](const std::vector<double>& x, int64_t heads, int64_t h) {
    std::vector<double> m(nb * d, 0.0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t length = std::min(bs, n - (j / bs) * bs);
      for (int64_t i = 0; i < d; ++i) m[(j / bs) * d + i] += x[(j * heads + h) * d + i] / length;
    }
    return m;
  };
  const std::vector<double> q_bar = means(q, dims.num_q_heads, head);
  const std::vector<double> k_bar = means(k, dims.num_kv_heads, kv_head);
  std::vector<double> want(nb * nb, -1.0);
  for (int64_t r = 0; r < nb; ++r) {
    double total = 0.0;
    for (int64_t c = 0; c <= r; ++c) {
      double logit = 0.0;
      for (int64_t i = 0; i < d; ++i) logit += q_bar[r * d + i] * k_bar[c * d + i];
      want[r * nb + c] = std::exp(logit / std::sqrt(static_cast<double>(d)));
      total += want[r * nb + c];
    }
    for (int64_t c = 0; c <= r; ++c) want[r * nb + c] /= total;
  }
  const std::vector<double> got = flex_prefill_block_probabilities(
      q.data(), k.data(), dims, FlexPrefillParams{0.9, 0.1, 1, 0, bs}, head);
  expect_close(got, want, 1e-12, 1e-12, "block probabilities");
  EXPECT_THROW(flex_prefill_block_probabilities(q.data(), k.data(), dims,
                                                FlexPrefillParams{0.9, 0.1, 1, 0, bs}, 4),
               Error);
}

// Zero keys: every attention row is uniform over its visible keys, so vertical_blk is
// [w, w, w, w, w, w, w, w'] with w = mean_r 64 / (449 + r) and abar is uniform (1/8); the JS
// distance is 0.0711446020090107 (computed by hand). The full-block scores tie exactly.
class FlexPrefillUniform : public ::testing::Test {
 protected:
  static constexpr int64_t kBlockSize = 64;
  static constexpr int64_t kNumBlocks = 8;
  const SparseAttentionDims dims_{512, 2, 1, 64};
  std::vector<double> q_ = random_vector(512 * 2 * 64, 70, 2.0);
  std::vector<double> k_ = std::vector<double>(512 * 1 * 64, 0.0);

  FlexPrefillSelection select(double gamma, double tau) {
    return flex_prefill_select(q_.data(), k_.data(), dims_,
                               FlexPrefillParams{gamma, tau, 1, 0, kBlockSize});
  }
};

// d = 0.0711 < tau = 0.1: query-aware, budgets 1 (column 0, main diagonal). The block-level
// attention is uniform per row (P[r, c] = 1 / (r + 1)), so sorted descending the cumulative sum
// reaches r + 1 after row r; with gamma * nb = 0.92 * 8 = 7.36 rows 0-6 fit whole (7), then two
// of row 7's eight tied 1/8 entries (7.25; a third gives 7.375): the lowest flat indices, (7, 0)
// and (7, 1).
TEST_F(FlexPrefillUniform, QueryAwareHeadAddsBlockCoverage) {
  const FlexPrefillSelection sel = select(0.92, 0.1);
  check_invariants(sel, dims_);
  const int64_t nb = kNumBlocks;
  std::vector<char> expected(nb * nb, 0);
  for (int64_t r = 0; r < nb - 1; ++r) {
    for (int64_t c = 0; c <= r; ++c) expected[r * nb + c] = 1;
  }
  expected[(nb - 1) * nb + 0] = 1;
  expected[(nb - 1) * nb + 1] = 1;
  expected[(nb - 1) * nb + nb - 1] = 1;
  for (int64_t h = 0; h < dims_.num_q_heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const FlexPrefillHeadStats& stats = sel.head_stats[h];
    EXPECT_TRUE(stats.query_aware);
    EXPECT_NEAR(stats.js_distance, 0.0711446020090107, 1e-12);
    EXPECT_EQ(stats.num_vertical_blocks, 1);
    EXPECT_EQ(stats.num_slash_blocks, 1);
    EXPECT_EQ(head_grid(sel.layout, h), expected);
    EXPECT_EQ(stats.num_selected_blocks, 31);
  }
}

// Step 8's block probabilities of zero keys: every row uniform, P[r, c] = 1 / (r + 1) exactly
// (equal logits), -1 above the diagonal.
TEST_F(FlexPrefillUniform, BlockProbabilitiesOfZeroKeysAreUniformRows) {
  const std::vector<double> probs = flex_prefill_block_probabilities(
      q_.data(), k_.data(), dims_, FlexPrefillParams{0.9, 0.1, 1, 0, kBlockSize}, 1);
  ASSERT_EQ(probs.size(), static_cast<size_t>(kNumBlocks * kNumBlocks));
  for (int64_t r = 0; r < kNumBlocks; ++r) {
    for (int64_t c = 0; c < kNumBlocks; ++c) {
      EXPECT_EQ(probs[r * kNumBlocks + c], c <= r ? 1.0 / static_cast<double>(r + 1) : -1.0)
          << "(" << r << ", " << c << ")";
    }
  }
}

// tau = 0.05 < d: vertical-slash head. The coverage count is 432 tokens for both vertical and
// slash (432 / 128 + 1 = 4 blocks). vertical_blk[1..6] tie, so the columns are 0 (+inf) and the
// lowest tied indices 1, 2, 3; slash_blk[1..6] tie, so the offsets are 0 (+inf) and
// 7 - {1, 2, 3} = {6, 5, 4}.
TEST_F(FlexPrefillUniform, VerticalSlashHeadBreaksTiesTowardLowerIndex) {
  const FlexPrefillSelection sel = select(0.9, 0.05);
  check_invariants(sel, dims_);
  const std::vector<char> expected = vertical_slash_grid(kNumBlocks, {0, 1, 2, 3}, {0, 4, 5, 6});
  for (int64_t h = 0; h < dims_.num_q_heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const FlexPrefillHeadStats& stats = sel.head_stats[h];
    EXPECT_FALSE(stats.query_aware);
    EXPECT_EQ(stats.num_vertical_blocks, 4);
    EXPECT_EQ(stats.num_slash_blocks, 4);
    EXPECT_EQ(head_grid(sel.layout, h), expected);
  }
}

// 1 + 511 x 2^-53: added one by one every term rounds away (ties to even), while the second chunk
// (256 terms, 2^-45 exactly) survives; a partial last chunk of 44 terms gives 44 x 2^-53.
TEST(FlexPrefillOrder, ChunkedSumAddsChunkTotalsInOrder) {
  ASSERT_EQ(kFlexPrefillSumChunk, 256);
  std::vector<double> x(512, 0x1p-53);
  x[0] = 1.0;
  double sequential = 0.0;
  for (double value : x) sequential += value;
  EXPECT_EQ(sequential, 1.0);
  EXPECT_EQ(flex_prefill_chunked_sum(x.data(), 512), 1.0 + 0x1p-45);
  EXPECT_EQ(flex_prefill_chunked_sum(x.data(), 300), 1.0 + 44 * 0x1p-53);
  EXPECT_EQ(flex_prefill_chunked_sum(x.data(), 256), 1.0);  // one chunk: the sequential sum
  EXPECT_EQ(flex_prefill_chunked_sum(x.data(), 0), 0.0);
}

// 0.5 then 511 x 2^-54: one by one the cumulative sum stays 0.5 (each term is half an ulp, ties to
// even), so all 512 entries stay <= 0.5; in the chunked order the second chunk's own prefix reaches
// 2 x 2^-54 at its second term, and base 0.5 plus that exceeds 0.5 at position 257.
TEST(FlexPrefillOrder, CoveragePrefixAddsInChunkPrefixesToChunkBases) {
  std::vector<double> x(512, 0x1p-54);
  x[0] = 0.5;
  double sequential = 0.0;
  int64_t sequential_count = 0;
  for (double value : x) {
    sequential += value;
    if (sequential > 0.5) break;
    ++sequential_count;
  }
  EXPECT_EQ(sequential_count, 512);
  EXPECT_EQ(flex_prefill_coverage_prefix(x.data(), 512, 0.5), 257);
  EXPECT_EQ(flex_prefill_coverage_prefix(x.data(), 256, 0.5), 256);
  EXPECT_EQ(flex_prefill_coverage_prefix(x.data(), 512, 0.25), 0);
  EXPECT_EQ(flex_prefill_coverage_prefix(x.data(), 512, 1.0), 512);
}

// Step 1's softmax denominator is chunked. Every query is e0 and every key but key 0 is -294 e0, so
// each last-block row has logit 0 at key 0 and -36.75 elsewhere: e = exp(-36.75) < 2^-53. Added one
// by one after the 1 of key 0, every e rounds away: the row sums would be 1 exactly, vertical[0] =
// 1 > gamma = 1 - 2^-50 and the vertical budget 1 block. In the chunked order the chunks after the
// first add about 700 e, vertical[0] is about 1 - 8e-14, and the first chunk of the sorted vertical
// values alone (vertical[0] and 255 values near e, each adding an ulp) stays below gamma: 256+
// entries, so at least 256 / 128 + 1 = 3 blocks.
TEST(FlexPrefillOrder, SoftmaxDenominatorIsChunked) {
  const SparseAttentionDims dims{1000, 1, 1, 64};
  std::vector<double> q(dims.seq_len * dims.head_dim, 0.0);
  std::vector<double> k(dims.seq_len * dims.head_dim, 0.0);
  for (int64_t i = 0; i < dims.seq_len; ++i) {
    q[i * dims.head_dim] = 1.0;
    if (i > 0) k[i * dims.head_dim] = -294.0;
  }
  EXPECT_EQ(1.0 + std::exp(-36.75), 1.0);
  const double gamma = 1.0 - 0x1p-50;
  const FlexPrefillSelection sel =
      flex_prefill_select(q.data(), k.data(), dims, FlexPrefillParams{gamma, 0.0, 1, 0, 64});
  ASSERT_FALSE(sel.dense_fallback);
  check_invariants(sel, dims);
  EXPECT_GE(sel.head_stats[0].num_vertical_blocks, 3);
}

}  // namespace
}  // namespace moeforge::ops
