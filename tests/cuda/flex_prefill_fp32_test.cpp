// The fp32 GPU FlexPrefill search (ops::FlexSearch::kFp32, cuda/flex_prefill_fp32.h) against the
// reference (ops/flex_prefill.h) on the same bf16 q and k, within a noise bound derived from the
// fp32 / tensor-core arithmetic (fp32_noise below):
//  - every vertical / slash value and block score within a relative rho of the reference's, with
//    step 1's passes on the mma.sync kernels and, on an sm_90 GPU, on the Hopper ones;
//  - step 2's coverage counts within those of the reference at gamma -/+ the coverage noise;
//  - per head, the query-aware decision equal to the reference's unless the reference's JS
//    distance is within the noise of tau (and the distance itself within the noise); the budgets
//    within the range the coverage noise allows; the block set equal to the reference's except for
//    columns / diagonals whose exact block score lies within the noise of the top-k cut and, for a
//    query-aware head, step-8 blocks within the noise of its fp32 logits and softmax and its
//    coverage cut (step8_band);
//  - gamma = 1 keeps the whole causal triangle (with and without the dense fallback);
//  - two runs give the same selection (the fp32 search's sums have fixed orders), also when the
//    means on the side stream are held back.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/flex_prefill.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_stages.h"
#include "cuda/side_stream.h"
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
using testing::flex::step8_logits;

// Block sizes 64 and 128, GQA groups 1 to 4, N not a multiple of the block (and 1024), head_dim 64,
// 128, 40 (a multiple of 8 but not of the MMA's 16) and 256; N = 20000 spans 20 key splits of the
// tensor-core passes with a partial last split and tile. At N = 1022 and 1086 (62 mod 64) the
// first 64-key tile of the passes that needs a causal mask ends one key past the first last-block
// row's position: it hides a single key from that row alone.
const Case kCases[] = {
    {1000, 8, 8, 64, 64},  {1900, 8, 4, 128, 128},  {700, 8, 2, 64, 64},   {1024, 4, 1, 128, 128},
    {3000, 8, 1, 64, 128}, {1000, 6, 2, 128, 64},   {1500, 4, 2, 40, 64},  {1300, 2, 1, 256, 128},
    {20000, 2, 1, 64, 64}, {20000, 2, 1, 128, 128}, {1022, 4, 2, 64, 128}, {1086, 4, 1, 128, 64},
};

// The fp32 search's error bound for query head h, following the derivation of
// cuda/flex_prefill_fp32.h term by term (first order in the unit roundoffs):
//   u = 2^-24 (fp32), u_tc = 2^-23 (a tensor-core addition may truncate instead of rounding),
//   e_exp = 2^-22 (exp2f is within 2 ulps), X = scale log2(e) max_r |q_r| max_j |k_j| >= |x|
//   (Cauchy-Schwarz, over the head's last-block queries and its KV head's keys);
//   dx    = (D + 1) u_tc X + 2 u X                       a logit's error
//   e_t   = e_exp + 2 ln2 u X                             one exponential (|argument| <= 2 X)
//   eps_z = e_t + (tile / 4 + 2 tiles + 2) u + tiles (e_t + u)   a row sum (its addition chain
//                                                                 and the split's rescales)
//   rho_p = 2 ln2 dx + eps_z + ln2 u (3 X + 2 log2 N) + e_exp     one probability
//   rho1  = rho_p + (bs + 4) u + bs 2^-53                a vertical / slash value or block score
//                                                        (its fp32 addition chain, the double
//                                                        pooling)
// rho1 is a sum of the first-order terms e_i of a product of factors (1 + e_i); the product
// differs from 1 by at most rho1 (1 + rho1) when rho1 < 1, so rho = rho1 (1 + rho1). Where fp32
// flushes a probability below 2^-126 to zero it loses at most 2^-126 of it: a value (a mean over bs
// rows) loses at most eta_value = 2^-126, a block score at most eta_block = bs 2^-126.
struct Noise {
  double rho = 0.0;
  double eta_value = 0x1.0p-126;
  double eta_block = 0.0;
};

Noise fp32_noise(const Inputs& in, const Case& c, int64_t h) {
  const double u = 0x1.0p-24, u_tc = 0x1.0p-23, e_exp = 0x1.0p-22;
  const double ln2 = std::log(2.0);
  const int64_t d = c.head_dim, bs = c.block_size, n = c.seq_len;
  const int64_t g = h / (c.num_q_heads / c.num_kv_heads);
  const auto norm = [&](const float* x) {
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) sum += static_cast<double>(x[i]) * x[i];
    return std::sqrt(sum);
  };
  double q_norm = 0.0, k_norm = 0.0;
  for (int64_t r = n - bs; r < n; ++r) {
    q_norm = std::max(q_norm, norm(in.q.data() + (r * c.num_q_heads + h) * d));
  }
  for (int64_t j = 0; j < n; ++j) {
    k_norm = std::max(k_norm, norm(in.k.data() + (j * c.num_kv_heads + g) * d));
  }
  const double x_bound =
      std::log2(std::exp(1.0)) / std::sqrt(static_cast<double>(d)) * q_norm * k_norm;
  const double tiles = static_cast<double>(kFp32SplitKeys / kFp32TileKeys);
  const double dx = static_cast<double>(d + 1) * u_tc * x_bound + 2.0 * u * x_bound;
  const double e_t = e_exp + 2.0 * ln2 * u * x_bound;
  const double eps_z =
      e_t + (static_cast<double>(kFp32TileKeys) / 4 + 2 * tiles + 2) * u + tiles * (e_t + u);
  const double rho_p = 2.0 * ln2 * dx + eps_z +
                       ln2 * u * (3.0 * x_bound + 2.0 * std::log2(static_cast<double>(n))) + e_exp;
  const double rho1 = rho_p + static_cast<double>(bs + 4) * u + static_cast<double>(bs) * 0x1.0p-53;
  Noise noise;
  noise.rho = rho1 * (1.0 + rho1);
  noise.eta_block = static_cast<double>(bs) * 0x1.0p-126;
  return noise;
}

// |got - want| <= rho want + eta for every element (want >= 0); reports the first violations.
template <typename T>
void expect_within_relative(const std::string& what, const T* got, const double* want,
                            int64_t count, double rho, double eta) {
  int64_t num_bad = 0;
  double worst = 0.0;  // the largest |got - want| / (rho want + eta)
  for (int64_t i = 0; i < count; ++i) {
    const double bound = rho * want[i] + eta;
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    worst = std::max(worst, err / bound);
    if (!(err <= bound)) {  // NaN fails
      if (++num_bad <= 3) {
        ADD_FAILURE() << what << "[" << i << "] = " << static_cast<double>(got[i]) << ", reference "
                      << want[i] << ", bound " << bound;
      }
    }
  }
  EXPECT_EQ(num_bad, 0) << what << ": " << num_bad << " of " << count
                        << " outside the bound (worst error / bound " << worst << ")";
}

// The reference's scores of every query head.
std::vector<ops::FlexPrefillHeadScores> reference_scores(const Inputs& in, const Case& c,
                                                         const ops::FlexPrefillParams& params) {
  std::vector<ops::FlexPrefillHeadScores> scores;
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    scores.push_back(
        ops::flex_prefill_head_scores<float>(in.q.data(), in.k.data(), dims_of(c), params, h));
  }
  return scores;
}

// Step 2's coverage noise: S_t / T of the fp32 values is within 2 rho / (1 - rho) of the
// reference's S_t (each of the t largest values and the total within relative rho), plus the
// flushed terms (eta_value each, on S_t and on T) and the roundings of the 2^-52 fixed point and of
// the reference's own double sums (at most one 2^-53 per value each, and gamma * total's).
double coverage_noise(const Noise& noise, int64_t n) {
  return 2.0 * noise.rho / (1.0 - noise.rho) + 2.0 * static_cast<double>(n) * noise.eta_value +
         static_cast<double>(n + 2) * 0x1.0p-52;
}

// The counts c - 1 of step 2 that values (the reference's, sorted here) allow within the noise:
// [count at gamma - eps, count at gamma + eps].
std::pair<int64_t, int64_t> count_range(std::vector<double> values, double gamma, double eps) {
  std::sort(values.begin(), values.end(), std::greater<>());
  const int64_t n = static_cast<int64_t>(values.size());
  return {ops::flex_prefill_coverage_prefix(values.data(), n, gamma - eps),
          ops::flex_prefill_coverage_prefix(values.data(), n, gamma + eps)};
}

// Steps 1-3 of the fp32 search, its passes run by `passes`, against the reference's scores: every
// vertical / slash value and block score within the noise, and the coverage counts within the
// counts the noise allows.
void expect_scores_within_noise(const Inputs& in, const Case& c, double gamma, Fp32Passes passes) {
  const ops::FlexPrefillParams params = params_of(c, gamma, 0.1);
  const flex::SearchShape s = flex::search_shape(dims_of(c), params, "test");
  const std::vector<ops::FlexPrefillHeadScores> ref = reference_scores(in, c, params);
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  const int64_t n = c.seq_len, nb = s.num_blocks;
  DeviceBuffer<float> vs(static_cast<size_t>(c.num_q_heads * 2 * n));
  DeviceBuffer<double> pooled(static_cast<size_t>(c.num_q_heads * 2 * nb));
  fp32_vertical_slash(vs.data(), pooled.data(), q.data(), k.data(), s, nullptr, passes);
  const std::vector<float> got_vs = vs.download();
  const std::vector<double> got_pooled = pooled.download();
  DeviceBuffer<unsigned long long> counts(static_cast<size_t>(c.num_q_heads * 2));
  fp32_coverage_counts(counts.data(), vs.data(), s, gamma, nullptr, nullptr, nullptr);
  const std::vector<unsigned long long> got_counts = counts.download();
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    const Noise noise = fp32_noise(in, c, h);
    ASSERT_LT(noise.rho, 1e-2) << "head " << h << ": inputs too large for a useful bound";
    const std::string head = "head " + std::to_string(h) + " ";
    expect_within_relative(head + "vertical", got_vs.data() + (h * 2) * n, ref[h].vertical.data(),
                           n, noise.rho, noise.eta_value);
    expect_within_relative(head + "slash", got_vs.data() + (h * 2 + 1) * n, ref[h].slash.data(), n,
                           noise.rho, noise.eta_value);
    expect_within_relative(head + "vertical_blk", got_pooled.data() + (h * 2) * nb,
                           ref[h].vertical_blk.data(), nb, noise.rho, noise.eta_block);
    expect_within_relative(head + "slash_blk", got_pooled.data() + (h * 2 + 1) * nb,
                           ref[h].slash_blk.data(), nb, noise.rho, noise.eta_block);
    const double eps = coverage_noise(noise, n);
    const auto [v_lo, v_hi] = count_range(ref[h].vertical, gamma, eps);
    const auto [s_lo, s_hi] = count_range(ref[h].slash, gamma, eps);
    const auto v_count = static_cast<int64_t>(got_counts[h * 2]);
    const auto s_count = static_cast<int64_t>(got_counts[h * 2 + 1]);
    EXPECT_TRUE(v_lo <= v_count && v_count <= v_hi) << head << "vertical coverage count " << v_count
                                                    << " outside [" << v_lo << ", " << v_hi << "]";
    EXPECT_TRUE(s_lo <= s_count && s_count <= s_hi) << head << "slash coverage count " << s_count
                                                    << " outside [" << s_lo << ", " << s_hi << "]";
  }
}

// Whether the Hopper passes take case c here (cuda/flex_prefill_fp32_passes.h): an sm_90 device,
// head_dim 64 or 128 (the kCases' block sizes are all 64 or 128).
bool hopper_passes_run(const Case& c) {
  return testing::hopper_device() && (c.head_dim == 64 || c.head_dim == 128);
}

TEST(FlexPrefillFp32, ScoresAndCoverageCountsWithinNoiseOfReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 111;
  int hopper_cases = 0;
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, seed++);
    for (double gamma : {0.5, 0.9, 1.0}) {
      SCOPED_TRACE(describe(c) + " gamma=" + std::to_string(gamma));
      {
        SCOPED_TRACE("mma.sync passes");
        expect_scores_within_noise(in, c, gamma, Fp32Passes::mma_sync);
      }
      if (hopper_passes_run(c)) {
        SCOPED_TRACE("Hopper passes");
        expect_scores_within_noise(in, c, gamma, Fp32Passes::hopper);
        ++hopper_cases;
      }
    }
  }
  if (hopper_cases == 0) std::cout << "[ NOTE     ] no sm_90 GPU: the Hopper passes did not run\n";
}

TEST(FlexPrefillFp32, HopperPassesRejectWhatTheyCannotRun) {
  MF_REQUIRE_GPU();
  const Case c{1500, 4, 2, 40, 64};  // head_dim 40: the mma.sync passes only
  const ops::FlexPrefillParams params = params_of(c, 0.9, 0.1);
  const flex::SearchShape s = flex::search_shape(dims_of(c), params, "test");
  const Inputs in = make_inputs(c, 7);
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  DeviceBuffer<float> vs(static_cast<size_t>(c.num_q_heads * 2 * c.seq_len));
  DeviceBuffer<double> pooled(static_cast<size_t>(c.num_q_heads * 2 * s.num_blocks));
  EXPECT_THROW(fp32_vertical_slash(vs.data(), pooled.data(), q.data(), k.data(), s, nullptr,
                                   Fp32Passes::hopper),
               Error);
}

// Key blocks (columns, kind 0) or diagonal offsets' indices (kind 1) that the top-n choice of the
// fp32 scores must take (`must`) and may take (`may`): the fp32 score of an index is within
// rho score + eta_block of its reference score, so an index whose reference score exceeds the n-th
// largest, thr, by more than the noise ((thr (1 + rho) + 2 eta) / (1 - rho)) outranks every index
// at or below thr and is among the top n; one below (thr (1 - rho) - 2 eta) / (1 + rho) is
// outranked by the n indices at or above thr. +inf (the always-kept block) is in both.
struct Band {
  std::vector<char> must, may;
};

Band top_band(std::vector<double> scores, int64_t always_kept, int64_t count, const Noise& noise) {
  scores[always_kept] = INFINITY;
  std::vector<double> sorted = scores;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const double thr = sorted[count - 1];
  const double rho = noise.rho, eta = noise.eta_block;
  Band band{std::vector<char>(scores.size(), 0), std::vector<char>(scores.size(), 0)};
  for (size_t i = 0; i < scores.size(); ++i) {
    const bool kept = scores[i] == INFINITY;
    band.must[i] = kept || scores[i] > (thr * (1 + rho) + 2 * eta) / (1 - rho);
    band.may[i] = kept || scores[i] >= (thr * (1 - rho) - 2 * eta) / (1 + rho);
  }
  return band;
}

// rho8 of step8_band for a head whose reference logits and their bounds E ([nb, nb]) are these:
// (1 + exp(2 max E) - 1) (1 + rho_sm) - 1, rho_sm the fp32 softmax's bound of
// cuda/flex_prefill_fp32.h for rows of at most nb logits whose span is at most the reference rows'
// widest plus 2 max E.
double step8_rho(const testing::flex::Step8Logits& logits, int64_t nb) {
  const double e_max = *std::max_element(logits.bound.begin(), logits.bound.end());
  double span = 0.0;
  for (int64_t r = 0; r < nb; ++r) {
    const auto row = logits.logit.begin() + r * nb;
    const auto [lo, hi] = std::minmax_element(row, row + r + 1);
    span = std::max(span, *hi - *lo);
  }
  const double rho_sm = 2.0 * ((span + 2.0 * e_max) * 0x1.0p-24 + 0x1.0p-22) + (nb + 1) * 0x1.0p-53;
  return std::expm1(2.0 * e_max) * (1.0 + rho_sm) + rho_sm;
}

// Step 8's blocks [nb, nb] that the fast search must keep (`must`) and may keep (`may`), from the
// reference's block probabilities P ([nb, nb], -1 above the diagonal). The device's probabilities
// are within a relative rho8 of P before their rounding to fp32 (step8_rho: its fp32 logits within
// E, exp(2 E) - 1, and its fp32 softmax's rho_sm). The fast search (cuda/coverage_select.h)
// orders the entries by their fp32 roundings, each within a relative r = (1 + 2^-24) (1 + rho8) - 1
// of P (2^-149 absolute for subnormals), so entries more than eps_v = max(2^-22,
// (1 + r) / (1 - r) - 1) apart keep their order and closer ones may swap; it sums 2^-52
// fixed-point values, each within a relative r and an absolute 2^-53 of P, and keeps the entries
// whose prefix sum stays <= gamma times the total of those values. So an entry is surely kept
// when every entry that may come before it (P >= p (1 - eps_v)) and itself, summed and inflated,
// stay below the limit deflated; it may be kept only when the entries that surely come before it
// (P > p (1 + eps_v)) and itself, summed and deflated, stay below the limit inflated. A relative
// 2^-40 covers the doubles' own last ulps and the host's long double sums.
Band step8_band(const std::vector<double>& probs, int64_t nb, double gamma, double rho8) {
  using Real = long double;
  const Real u = (1 + 0x1.0p-24L) * (1 + static_cast<Real>(rho8)) - 1, tiny = 0x1.0p-148L;
  const Real eps_v = std::max(0x1.0p-22L, (1 + u) / (1 - u) - 1) + 0x1.0p-40L;
  const Real fixed_err = 0x1.0p-53L, slack = 0x1.0p-40L;
  std::vector<double> sorted;
  for (int64_t r = 0; r < nb; ++r) {
    for (int64_t c = 0; c <= r; ++c) sorted.push_back(probs[r * nb + c]);
  }
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const int64_t n = static_cast<int64_t>(sorted.size());
  std::vector<Real> prefix(n + 1, 0.0L);  // prefix[k] = the sum of the k largest
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + sorted[t];
  const Real total = prefix[n];
  const Real limit_lo = gamma * (total * (1 - u) - n * fixed_err) * (1 - slack) - 0x1.0p-52L;
  const Real limit_hi = gamma * (total * (1 + u) + n * fixed_err) * (1 + slack) + 0x1.0p-52L;
  // The number of sorted values >= x, and > x.
  const auto at_least = [&](Real x) {
    return std::upper_bound(sorted.begin(), sorted.end(), x,
                            [](Real a, double b) { return a > static_cast<Real>(b); }) -
           sorted.begin();
  };
  const auto above = [&](Real x) {
    return std::lower_bound(sorted.begin(), sorted.end(), x,
                            [](double a, Real b) { return static_cast<Real>(a) > b; }) -
           sorted.begin();
  };
  Band band{std::vector<char>(nb * nb, 0), std::vector<char>(nb * nb, 0)};
  for (int64_t r = 0; r < nb; ++r) {
    for (int64_t c = 0; c <= r; ++c) {
      const Real p = probs[r * nb + c];
      const int64_t k_may = at_least(p * (1 - eps_v) - tiny);  // itself included
      const int64_t k_sure = above(p * (1 + eps_v) + tiny);
      band.must[r * nb + c] = prefix[k_may] * (1 + u) + k_may * fixed_err <= limit_lo;
      band.may[r * nb + c] = (prefix[k_sure] + p) * (1 - u) - (k_sure + 1) * fixed_err <= limit_hi;
    }
  }
  return band;
}

// Columns `cols` and diagonals of slash indices `diags` (offset nb - 1 - index) over the causal
// grid (step 7).
std::vector<char> expand(const std::vector<char>& cols, const std::vector<char>& diags,
                         int64_t nb) {
  std::vector<char> grid(nb * nb, 0);
  for (int64_t col = 0; col < nb; ++col) {
    if (cols[col] == 0) continue;
    for (int64_t r = col; r < nb; ++r) grid[r * nb + col] = 1;
  }
  for (int64_t index = 0; index < nb; ++index) {
    if (diags[index] == 0) continue;
    const int64_t offset = nb - 1 - index;
    for (int64_t r = offset; r < nb; ++r) grid[r * nb + r - offset] = 1;
  }
  return grid;
}

// Blocks of `sub` missing from `super`, as "(r, c)" (at most 4 listed), and their number.
std::string missing_blocks(const std::vector<char>& sub, const std::vector<char>& super, int64_t nb,
                           int64_t* num_missing) {
  std::string listed;
  *num_missing = 0;
  for (int64_t i = 0; i < nb * nb; ++i) {
    if (sub[i] != 0 && super[i] == 0 && ++*num_missing <= 4) {
      listed += " (" + std::to_string(i / nb) + ", " + std::to_string(i % nb) + ")";
    }
  }
  return listed;
}

void expect_subset(const std::string& what, const std::vector<char>& sub,
                   const std::vector<char>& super, int64_t nb) {
  int64_t num_missing = 0;
  const std::string listed = missing_blocks(sub, super, nb, &num_missing);
  EXPECT_EQ(num_missing, 0) << what << ":" << listed;
}

// Runs the fp32 search and checks its selection against the reference's within the noise (see the
// file comment). Returns the number of heads whose query-aware decision was compared (the others
// had a reference JS distance within the noise of tau).
int64_t expect_selection_within_noise(const Inputs& in, const Case& c,
                                      ops::FlexPrefillParams params) {
  params.search = ops::FlexSearch::kFp32;
  const ops::FlexPrefillSelection ref =
      ops::flex_prefill_select<float>(in.q.data(), in.k.data(), dims_of(c), params);
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  FlexPrefillDeviceSelection device_sel;
  flex_prefill_select(device_sel, q.data(), k.data(), dims_of(c), params, nullptr);
  const ops::FlexPrefillSelection got = download_selection(device_sel);
  ops::check_block_sparse_layout(got.layout, c.num_q_heads, c.seq_len, "fp32 selection");
  expect_head_totals_match_layout(got);
  EXPECT_EQ(got.dense_fallback, ref.dense_fallback);
  EXPECT_EQ(got.layout.num_blocks, ref.layout.num_blocks);
  if (ref.dense_fallback || got.dense_fallback) {
    expect_equal("row_offsets", got.layout.row_offsets, ref.layout.row_offsets);
    expect_equal("col_idx", got.layout.col_idx, ref.layout.col_idx);
    return 0;
  }
  const int64_t nb = ref.layout.num_blocks;
  const int64_t bs = c.block_size;
  const int64_t min_blocks = (params.min_budget + bs - 1) / bs;
  const int64_t max_blocks =
      params.max_budget > 0 ? std::min((params.max_budget + bs - 1) / bs, nb) : nb;
  const auto budget_of = [&](int64_t count) {
    return std::clamp((count + 1) / 128 + 1, min_blocks, max_blocks);
  };
  const std::vector<ops::FlexPrefillHeadScores> scores = reference_scores(in, c, params);
  int64_t num_decided = 0;
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Noise noise = fp32_noise(in, c, h);
    const ops::FlexPrefillHeadStats& want = ref.head_stats[h];
    const ops::FlexPrefillHeadStats& have = got.head_stats[h];

    // (a) The JS distance: its square moves by at most rho (the derivative bound of
    // cuda/flex_prefill_fp32.h: sum_c |ln(v_c / m_c)| rho v_c / 2 <= ln2 rho (1 + rho) <= rho),
    // plus the flushed block scores (x |ln(x / m)| <= 2^-112 for x <= 2^-119: 2^-111 a block) and
    // the double roundings of the 2 nb terms (a few ulps each, <= 2^-50, the sum <= 1).
    const double js = want.js_distance * want.js_distance;
    const double eps_js = noise.rho + static_cast<double>(nb) * (0x1.0p-111 + 2 * 0x1.0p-50);
    const double d_lo = std::sqrt(std::max(0.0, js - eps_js));
    const double d_hi = std::sqrt(js + eps_js);
    EXPECT_TRUE(d_lo <= have.js_distance && have.js_distance <= d_hi)
        << "JS distance " << have.js_distance << " outside [" << d_lo << ", " << d_hi << "]";
    if (d_lo <= params.tau && params.tau <= d_hi) continue;  // a decision within the noise
    ++num_decided;
    EXPECT_EQ(have.query_aware, want.query_aware) << "JS distance " << want.js_distance;
    if (have.query_aware != want.query_aware) continue;

    // (b) Budgets within the coverage noise.
    int64_t num_v = min_blocks, num_s = min_blocks;
    if (!want.query_aware) {
      const double eps = coverage_noise(noise, c.seq_len);
      const auto [v_lo, v_hi] = count_range(scores[h].vertical, params.gamma, eps);
      const auto [s_lo, s_hi] = count_range(scores[h].slash, params.gamma, eps);
      num_v = have.num_vertical_blocks;
      num_s = have.num_slash_blocks;
      EXPECT_TRUE(budget_of(v_lo) <= num_v && num_v <= budget_of(v_hi))
          << "vertical budget " << num_v << " outside [" << budget_of(v_lo) << ", "
          << budget_of(v_hi) << "]";
      EXPECT_TRUE(budget_of(s_lo) <= num_s && num_s <= budget_of(s_hi))
          << "slash budget " << num_s << " outside [" << budget_of(s_lo) << ", " << budget_of(s_hi)
          << "]";
    } else {
      EXPECT_EQ(have.num_vertical_blocks, min_blocks);
      EXPECT_EQ(have.num_slash_blocks, min_blocks);
    }

    // (c) Blocks: the reference's except within the top-k band and, for a query-aware head, step
    // 8's band (step8_band); the reference's own blocks must lie within the bands too.
    const Band cols = top_band(scores[h].vertical_blk, 0, num_v, noise);
    const Band diags = top_band(scores[h].slash_blk, nb - 1, num_s, noise);
    std::vector<char> must = expand(cols.must, diags.must, nb);
    std::vector<char> may = expand(cols.may, diags.may, nb);
    if (want.query_aware) {
      const double rho8 = step8_rho(step8_logits(in, c, h), nb);
      const Band step8 = step8_band(
          ops::flex_prefill_block_probabilities(in.q.data(), in.k.data(), dims_of(c), params, h),
          nb, params.gamma, rho8);
      for (int64_t i = 0; i < nb * nb; ++i) {
        must[i] = must[i] != 0 || step8.must[i] != 0;
        may[i] = may[i] != 0 || step8.may[i] != 0;
      }
    }
    const std::vector<char> have_grid = head_grid(got.layout, h);
    const std::vector<char> want_grid = head_grid(ref.layout, h);
    expect_subset("blocks the fp32 search must select but did not", must, have_grid, nb);
    expect_subset("blocks the fp32 search selected outside the noise band", have_grid, may, nb);
    expect_subset("blocks the reference lacks from the band's core (the band is wrong)", must,
                  want_grid, nb);
    expect_subset("blocks the reference selected outside the band (the band is wrong)", want_grid,
                  may, nb);
  }
  return num_decided;
}

TEST(FlexPrefillFp32, SelectionWithinNoiseOfReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 111;
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, seed++);
    for (double gamma : {0.5, 0.9}) {
      for (double tau : {0.0, 0.1, 1.0}) {
        SCOPED_TRACE(describe(c) + " gamma=" + std::to_string(gamma) +
                     " tau=" + std::to_string(tau));
        const int64_t num_decided = expect_selection_within_noise(in, c, params_of(c, gamma, tau));
        // The odd heads' JS distances (0.25-0.4) are far from every tau here, so a noise band
        // that leaves fewer decisions to compare is too wide to test anything.
        EXPECT_GE(2 * num_decided, c.num_q_heads);
      }
    }
  }
}

TEST(FlexPrefillFp32, EveryGroupSizeWithinNoiseOfReference) {
  MF_REQUIRE_GPU();
  for (int64_t group = 1; group <= 8; ++group) {
    const Case c{1500, 2 * group, 2, 64, 64};
    SCOPED_TRACE(describe(c));
    expect_selection_within_noise(make_inputs(c, 20 + group), c, params_of(c, 0.9, 0.1));
  }
}

// gamma = 1 keeps everything: with tau = 0 (no query-aware head), block size 128 and N not a
// multiple of 128, both coverage counts are N (every prefix of the values is <= their total), so
// both budgets are N / 128 + 1 = nb and the columns alone cover the causal triangle; and with
// min_budget >= N the dense fallback does.
TEST(FlexPrefillFp32, GammaOneKeepsTheWholeTriangle) {
  MF_REQUIRE_GPU();
  for (const Case& c : {Case{3000, 4, 2, 64, 128}, Case{1900, 8, 4, 128, 128}}) {
    const Inputs in = make_inputs(c, 7);
    ops::FlexPrefillParams sparse = params_of(c, 1.0, 0.0);
    ops::FlexPrefillParams dense = params_of(c, 1.0, 0.1);
    dense.min_budget = c.seq_len;
    for (ops::FlexPrefillParams params : {sparse, dense}) {
      params.search = ops::FlexSearch::kFp32;
      SCOPED_TRACE(describe(c) + " min_budget=" + std::to_string(params.min_budget));
      DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
      FlexPrefillDeviceSelection device_sel;
      flex_prefill_select(device_sel, q.data(), k.data(), dims_of(c), params, nullptr);
      const ops::FlexPrefillSelection got = download_selection(device_sel);
      EXPECT_EQ(got.dense_fallback, params.min_budget >= c.seq_len);
      const ops::BlockSparseLayout whole =
          ops::dense_causal_layout(c.num_q_heads, c.seq_len, c.block_size);
      expect_equal("row_offsets", got.layout.row_offsets, whole.row_offsets);
      expect_equal("col_idx", got.layout.col_idx, whole.col_idx);
      for (const ops::FlexPrefillHeadStats& stats : got.head_stats) {
        EXPECT_EQ(stats.density, 1.0);
        if (!got.dense_fallback) {
          EXPECT_EQ(stats.num_vertical_blocks, got.layout.num_blocks);
          EXPECT_EQ(stats.num_slash_blocks, got.layout.num_blocks);
        }
      }
    }
  }
}

// The same block sets and, bit for bit, the same JS distances.
void expect_same_selection(const ops::FlexPrefillSelection& got,
                           const ops::FlexPrefillSelection& want) {
  expect_equal("row_offsets", got.layout.row_offsets, want.layout.row_offsets);
  expect_equal("col_idx", got.layout.col_idx, want.layout.col_idx);
  ASSERT_EQ(got.head_stats.size(), want.head_stats.size());
  for (size_t h = 0; h < want.head_stats.size(); ++h) {
    EXPECT_EQ(got.head_stats[h].js_distance, want.head_stats[h].js_distance) << "head " << h;
  }
}

TEST(FlexPrefillFp32, RepeatedRunsGiveTheSameSelection) {
  MF_REQUIRE_GPU();
  const Case c{20000, 4, 2, 128, 128};
  const Inputs in = make_inputs(c, 5);
  ops::FlexPrefillParams params = params_of(c, 0.9, 0.1);
  params.search = ops::FlexSearch::kFp32;
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  FlexPrefillDeviceSelection first_sel, second_sel;
  flex_prefill_select(first_sel, q.data(), k.data(), dims_of(c), params, nullptr);
  flex_prefill_select(second_sel, q.data(), k.data(), dims_of(c), params, nullptr);
  expect_same_selection(download_selection(second_sel), download_selection(first_sel));
}

// Every path of the coverage select gives the same selection: with tau 0 no head is query-aware, so
// step 2 selects for every head (20000 values a segment: clusters of 4 blocks on an H200); with tau
// 0.1 step 8 does for the query-aware heads (157-block triangles: 2 blocks) and step 2 for the odd
// heads, whose JS distances are 0.25-0.4.
TEST(FlexPrefillFp32, EverySelectPathGivesTheSameSelection) {
  MF_REQUIRE_GPU();
  const Case c{20000, 4, 2, 128, 128};
  const Inputs in = make_inputs(c, 6);
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  for (const double tau : {0.0, 0.1}) {
    SCOPED_TRACE("tau " + std::to_string(tau));
    ops::FlexPrefillParams params = params_of(c, 0.9, tau);
    params.search = ops::FlexSearch::kFp32;
    FlexPrefillDeviceSelection many_sel, cluster_sel;
    flex_prefill_select(many_sel, q.data(), k.data(), dims_of(c), params, nullptr,
                        SelectPath::many_blocks);
    flex_prefill_select(cluster_sel, q.data(), k.data(), dims_of(c), params, nullptr,
                        SelectPath::clusters);
    const ops::FlexPrefillSelection many = download_selection(many_sel);
    expect_same_selection(download_selection(cluster_sel), many);
    int64_t query_aware = 0;
    for (const ops::FlexPrefillHeadStats& stats : many.head_stats) query_aware += stats.query_aware;
    EXPECT_EQ(query_aware > 0, tau > 0.0) << query_aware << " query-aware heads";
  }
}

// The fast search runs its means on the side stream (cuda/side_stream.h). Held back there for
// 100 ms, they must still be what steps 4 and 8 read: the selection equals one made on time. A
// search on other inputs first leaves its own means in the blocks the allocator hands out again,
// so a step that read them early would choose differently.
TEST(FlexPrefillFp32, LateSideStreamGivesTheSameSelection) {
  MF_REQUIRE_GPU();
  const Case c{20000, 4, 2, 128, 128};
  ops::FlexPrefillParams params = params_of(c, 0.9, 0.1);
  params.search = ops::FlexSearch::kFp32;
  const Inputs other = make_inputs(c, 6), in = make_inputs(c, 7);
  DeviceBuffer<bf16> other_q = to_device(to_bf16(other.q)), other_k = to_device(to_bf16(other.k));
  DeviceBuffer<bf16> q = to_device(to_bf16(in.q)), k = to_device(to_bf16(in.k));
  FlexPrefillDeviceSelection other_sel, late_sel, on_time_sel;
  flex_prefill_select(other_sel, other_q.data(), other_k.data(), dims_of(c), params, nullptr);
  MF_CUDA_CHECK(cudaLaunchHostFunc(
      fork_side_stream(nullptr),
      [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(100)); }, nullptr));
  flex_prefill_select(late_sel, q.data(), k.data(), dims_of(c), params, nullptr);
  flex_prefill_select(on_time_sel, q.data(), k.data(), dims_of(c), params, nullptr);
  expect_same_selection(download_selection(late_sel), download_selection(on_time_sel));
}

}  // namespace
}  // namespace moeforge::cuda
