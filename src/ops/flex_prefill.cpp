// FlexPrefill pattern search on the CPU, one query head at a time (steps in flex_prefill.h).
#include "ops/flex_prefill.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "ops/dot.h"

namespace moeforge::ops {

namespace {

// Tokens per budget block in step 2: hard-coded in the reference, independent of block_size.
constexpr int64_t kBudgetDivisor = 128;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// In place: x = softmax(x), the denominator in the chunked order.
void softmax(std::vector<double>& x) {
  const double max_value = *std::max_element(x.begin(), x.end());
  for (double& value : x) value = std::exp(value - max_value);
  const double sum = flex_prefill_chunked_sum(x.data(), static_cast<int64_t>(x.size()));
  for (double& value : x) value /= sum;
}

// Indices of values, the larger value first, equal values by the lower index.
std::vector<int64_t> order_descending(const std::vector<double>& values) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return values[a] != values[b] ? values[a] > values[b] : a < b;
  });
  return order;
}

// 1 + the number of chunked prefix sums of the values sorted descending that stay <= gamma
// (step 2).
int64_t coverage_count(std::vector<double> values, double gamma) {
  std::sort(values.begin(), values.end(), std::greater<>());
  return 1 +
         flex_prefill_coverage_prefix(values.data(), static_cast<int64_t>(values.size()), gamma);
}

// Sums of x over consecutive blocks of block_size (the last one over the remaining entries).
std::vector<double> sum_pool(const std::vector<double>& x, int64_t block_size) {
  const int64_t size = static_cast<int64_t>(x.size());
  std::vector<double> pooled(ceil_div(size, block_size), 0.0);
  for (int64_t j = 0; j < size; ++j) pooled[j / block_size] += x[j];
  return pooled;
}

// Square root of the Jensen-Shannon divergence (natural logs, 0 log 0 = 0).
double js_distance(const std::vector<double>& p, const std::vector<double>& q) {
  double js = 0.0;
  for (size_t c = 0; c < p.size(); ++c) {
    const double m = 0.5 * (p[c] + q[c]);
    if (p[c] > 0.0) js += 0.5 * p[c] * std::log(p[c] / m);
    if (q[c] > 0.0) js += 0.5 * q[c] * std::log(q[c] / m);
  }
  return std::sqrt(std::max(js, 0.0));
}

template <typename T>
void check_finite(const T* x, int64_t size, const char* name) {
  for (int64_t i = 0; i < size; ++i) {
    MF_CHECK(std::isfinite(static_cast<double>(x[i])),
             "flex_prefill_select: {} has a non-finite entry ({}) at flat index {}", name,
             static_cast<double>(x[i]), i);
  }
}

// Per block of positions, the mean over the block's real rows of x[:, head, :] times factor:
// [num_blocks, head_dim].
template <typename T>
std::vector<double> block_means(const T* x, int64_t seq_len, int64_t num_heads, int64_t head,
                                int64_t head_dim, int64_t block_size, double factor) {
  const int64_t num_blocks = ceil_div(seq_len, block_size);
  std::vector<double> means(num_blocks * head_dim, 0.0);
  for (int64_t j = 0; j < seq_len; ++j) {
    const T* row = x + (j * num_heads + head) * head_dim;
    double* mean = means.data() + (j / block_size) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) mean[d] += static_cast<double>(row[d]);
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t length = std::min(block_size, seq_len - b * block_size);
    for (int64_t d = 0; d < head_dim; ++d) means[b * head_dim + d] *= factor / length;
  }
  return means;
}

// Steps 1, 3 and 4 for query head `head` given the key block means of its KV head ([nb, D]).
template <typename T>
FlexPrefillHeadScores head_scores(const T* q, const T* k, const std::vector<double>& k_means,
                                  const SparseAttentionDims& dims, const FlexPrefillParams& params,
                                  int64_t head) {
  const int64_t seq_len = dims.seq_len;
  const int64_t head_dim = dims.head_dim;
  const int64_t bs = params.block_size;
  const int64_t nb = ceil_div(seq_len, bs);
  const int64_t kv_head = head / (dims.num_q_heads / dims.num_kv_heads);
  const int64_t q_row = dims.num_q_heads * head_dim;
  const int64_t kv_row = dims.num_kv_heads * head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

  // Step 1: attention of the last bs queries, its column sums and its diagonal sums.
  FlexPrefillHeadScores scores;
  std::vector<double>& vertical = scores.vertical;  // [N]
  std::vector<double>& slash = scores.slash;        // [N], index N-1 = main diagonal
  vertical.assign(seq_len, 0.0);
  slash.assign(seq_len, 0.0);
  std::vector<double> q_mean(head_dim, 0.0);  // mean of the scaled last-block queries
  std::vector<double> probs;
  for (int64_t r = 0; r < bs; ++r) {
    const int64_t position = seq_len - bs + r;
    const T* q_vec = q + position * q_row + head * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) q_mean[d] += scale * static_cast<double>(q_vec[d]);
    probs.resize(position + 1);
    for (int64_t j = 0; j <= position; ++j) {
      probs[j] = scale * dot_double(q_vec, k + j * kv_row + kv_head * head_dim, head_dim);
    }
    softmax(probs);
    for (int64_t j = 0; j <= position; ++j) {
      vertical[j] += probs[j];
      slash[j - r + bs - 1] += probs[j];
    }
  }
  for (int64_t j = 0; j < seq_len; ++j) {
    vertical[j] /= static_cast<double>(bs);
    slash[j] /= static_cast<double>(bs);
  }
  for (double& value : q_mean) value /= static_cast<double>(bs);

  // Step 3: block scores.
  scores.vertical_blk = sum_pool(vertical, bs);  // [nb]
  scores.slash_blk = sum_pool(slash, bs);        // [nb]

  // Step 4: the distance of the pattern decision.
  std::vector<double> abar(nb);
  for (int64_t c = 0; c < nb; ++c) {
    abar[c] = dot_double(q_mean.data(), k_means.data() + c * head_dim, head_dim);
  }
  softmax(abar);
  scores.js_distance = js_distance(abar, scores.vertical_blk);
  return scores;
}

// Step 8's block probabilities of query head `head` given the key block means of its KV head
// ([nb, D]): [nb, nb] row-major, row r the softmax over c <= r of Qbar[r] . Kbar[c], -1 for c > r.
template <typename T>
std::vector<double> block_probabilities(const T* q, const std::vector<double>& k_means,
                                        const SparseAttentionDims& dims, int64_t block_size,
                                        int64_t head) {
  const int64_t head_dim = dims.head_dim;
  const int64_t nb = ceil_div(dims.seq_len, block_size);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const std::vector<double> q_means =
      block_means(q, dims.seq_len, dims.num_q_heads, head, head_dim, block_size, scale);
  std::vector<double> block_probs(nb * nb, -1.0);
  std::vector<double> row_probs;
  for (int64_t r = 0; r < nb; ++r) {
    row_probs.resize(r + 1);
    for (int64_t c = 0; c <= r; ++c) {
      row_probs[c] =
          dot_double(q_means.data() + r * head_dim, k_means.data() + c * head_dim, head_dim);
    }
    softmax(row_probs);
    std::copy(row_probs.begin(), row_probs.end(), block_probs.begin() + r * nb);
  }
  return block_probs;
}

struct HeadSelection {
  std::vector<char> grid;  // [nb, nb] row-major: 1 where (query block, key block) is selected
  FlexPrefillHeadStats stats;
};

// Steps 1-8 for query head `head` given the key block means of its KV head ([nb, D]).
template <typename T>
HeadSelection select_head(const T* q, const T* k, const std::vector<double>& k_means,
                          const SparseAttentionDims& dims, const FlexPrefillParams& params,
                          int64_t head, int64_t min_blocks, int64_t max_blocks) {
  const int64_t nb = ceil_div(dims.seq_len, params.block_size);
  FlexPrefillHeadScores scores = head_scores(q, k, k_means, dims, params, head);

  // Step 2: budgets from the cumulative coverage.
  HeadSelection selection;
  FlexPrefillHeadStats& stats = selection.stats;
  stats.num_vertical_blocks = std::clamp(
      coverage_count(scores.vertical, params.gamma) / kBudgetDivisor + 1, min_blocks, max_blocks);
  stats.num_slash_blocks = std::clamp(
      coverage_count(scores.slash, params.gamma) / kBudgetDivisor + 1, min_blocks, max_blocks);

  // Step 4: pattern decision.
  stats.js_distance = scores.js_distance;
  stats.query_aware = stats.js_distance < params.tau;
  if (stats.query_aware) {
    stats.num_vertical_blocks = min_blocks;
    stats.num_slash_blocks = min_blocks;
  }
  std::vector<double>& vertical_blk = scores.vertical_blk;
  std::vector<double>& slash_blk = scores.slash_blk;

  // Steps 5-7: top-k columns and diagonals, expanded to the causal block grid.
  vertical_blk[0] = std::numeric_limits<double>::infinity();
  slash_blk[nb - 1] = std::numeric_limits<double>::infinity();
  selection.grid.assign(nb * nb, 0);
  const std::vector<int64_t> vertical_order = order_descending(vertical_blk);
  for (int64_t t = 0; t < stats.num_vertical_blocks; ++t) {
    const int64_t col = vertical_order[t];
    for (int64_t r = col; r < nb; ++r) selection.grid[r * nb + col] = 1;
  }
  const std::vector<int64_t> slash_order = order_descending(slash_blk);
  for (int64_t t = 0; t < stats.num_slash_blocks; ++t) {
    const int64_t offset = nb - 1 - slash_order[t];
    for (int64_t r = offset; r < nb; ++r) selection.grid[r * nb + r - offset] = 1;
  }

  // Step 8: query-aware heads add the block-level attention's gamma * nb coverage.
  if (stats.query_aware) {
    const std::vector<double> block_probs =
        block_probabilities(q, k_means, dims, params.block_size, head);
    // The causal entries (>= 0) come first in this order, the -1 marks after them.
    const std::vector<int64_t> order = order_descending(block_probs);
    const int64_t num_causal = nb * (nb + 1) / 2;
    std::vector<double> sorted(num_causal);
    for (int64_t t = 0; t < num_causal; ++t) sorted[t] = block_probs[order[t]];
    const int64_t num_kept = flex_prefill_coverage_prefix(sorted.data(), num_causal,
                                                          params.gamma * static_cast<double>(nb));
    for (int64_t t = 0; t < num_kept; ++t) selection.grid[order[t]] = 1;
  }

  stats.num_selected_blocks = std::count(selection.grid.begin(), selection.grid.end(), 1);
  stats.density =
      static_cast<double>(stats.num_selected_blocks) / static_cast<double>(nb * (nb + 1) / 2);
  return selection;
}

// The checks of the per-head entry points (`who` names the caller in the messages; the seq_len
// check is the caller's) and the key block means of `head`'s KV head ([nb, D]).
template <typename T>
std::vector<double> checked_head_k_means(const T* q, const T* k, const SparseAttentionDims& dims,
                                         const FlexPrefillParams& params, int64_t head,
                                         const char* who) {
  MF_CHECK(head >= 0 && head < dims.num_q_heads, "{}: head must be in [0, {}), got {}", who,
           dims.num_q_heads, head);
  check_finite(q, dims.seq_len * dims.num_q_heads * dims.head_dim, "q");
  check_finite(k, dims.seq_len * dims.num_kv_heads * dims.head_dim, "k");
  const int64_t kv_head = head / (dims.num_q_heads / dims.num_kv_heads);
  return block_means(k, dims.seq_len, dims.num_kv_heads, kv_head, dims.head_dim, params.block_size,
                     1.0);
}

}  // namespace

double flex_prefill_chunked_sum(const double* x, int64_t n) {
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += kFlexPrefillSumChunk) {
    const int64_t end = std::min(n, begin + kFlexPrefillSumChunk);
    double chunk = 0.0;
    for (int64_t t = begin; t < end; ++t) chunk += x[t];
    total += chunk;
  }
  return total;
}

int64_t flex_prefill_coverage_prefix(const double* x, int64_t n, double limit) {
  double base = 0.0;  // the chunk totals before the current chunk, in ascending order
  for (int64_t begin = 0; begin < n; begin += kFlexPrefillSumChunk) {
    const int64_t end = std::min(n, begin + kFlexPrefillSumChunk);
    double prefix = 0.0;
    for (int64_t t = begin; t < end; ++t) {
      prefix += x[t];
      if (base + prefix > limit) return t;
    }
    base += prefix;
  }
  return n;
}

void check_flex_prefill_params(const FlexPrefillParams& p) {
  MF_CHECK(p.gamma > 0.0 && p.gamma <= 1.0, "FlexPrefill: gamma must be in (0, 1], got {}",
           p.gamma);
  MF_CHECK(std::isfinite(p.tau) && p.tau >= 0.0,
           "FlexPrefill: tau must be a finite value >= 0 (0 disables query-aware heads), got {}",
           p.tau);
  MF_CHECK(p.block_size == 64 || p.block_size == 128,
           "FlexPrefill: block_size must be 64 or 128, got {}", p.block_size);
  MF_CHECK(p.min_budget >= 1, "FlexPrefill: min_budget (tokens) must be >= 1, got {}",
           p.min_budget);
  MF_CHECK(p.max_budget <= 0 || p.max_budget >= p.min_budget,
           "FlexPrefill: max_budget (tokens) must be <= 0 (unlimited) or >= min_budget={}, got {}",
           p.min_budget, p.max_budget);
  MF_CHECK(p.search == FlexSearch::kExact || p.search == FlexSearch::kFp32,
           "FlexPrefill: search must be FlexSearch::kExact or kFp32, got {}",
           static_cast<int>(p.search));
}

const char* flex_search_name(FlexSearch search) {
  return search == FlexSearch::kFp32 ? "fast" : "exact";
}

template <typename T>
FlexPrefillSelection flex_prefill_select(const T* q, const T* k, const SparseAttentionDims& dims,
                                         const FlexPrefillParams& params) {
  check_sparse_attention_dims(dims, "flex_prefill_select");
  check_flex_prefill_params(params);
  MF_CHECK(dims.seq_len >= 1, "flex_prefill_select: seq_len must be >= 1, got {}", dims.seq_len);
  const int64_t seq_len = dims.seq_len;
  const int64_t bs = params.block_size;
  const int64_t nb = ceil_div(seq_len, bs);
  const int64_t min_blocks = ceil_div(params.min_budget, bs);
  const int64_t max_blocks =
      params.max_budget > 0 ? std::min(ceil_div(params.max_budget, bs), nb) : nb;

  FlexPrefillSelection selection;
  selection.head_stats.resize(dims.num_q_heads);

  // Step 0: short inputs are dense.
  if (seq_len <= std::max(2 * bs, min_blocks * bs)) {
    selection.dense_fallback = true;
    selection.layout = dense_causal_layout(dims.num_q_heads, seq_len, bs);
    for (FlexPrefillHeadStats& stats : selection.head_stats) {
      stats.js_distance = std::numeric_limits<double>::quiet_NaN();
      stats.num_selected_blocks = nb * (nb + 1) / 2;
      stats.density = 1.0;
    }
    return selection;
  }
  check_finite(q, seq_len * dims.num_q_heads * dims.head_dim, "q");
  check_finite(k, seq_len * dims.num_kv_heads * dims.head_dim, "k");

  std::vector<std::vector<double>> k_means(dims.num_kv_heads);  // [num_kv_heads][nb, D]
  for (int64_t g = 0; g < dims.num_kv_heads; ++g) {
    k_means[g] = block_means(k, seq_len, dims.num_kv_heads, g, dims.head_dim, bs, 1.0);
  }
  const int64_t group_size = dims.num_q_heads / dims.num_kv_heads;
  std::vector<HeadSelection> heads(dims.num_q_heads);
#pragma omp parallel for
  for (int64_t h = 0; h < dims.num_q_heads; ++h) {
    heads[h] = select_head(q, k, k_means[h / group_size], dims, params, h, min_blocks, max_blocks);
  }

  BlockSparseLayout& layout = selection.layout;
  layout.num_heads = dims.num_q_heads;
  layout.num_blocks = nb;
  layout.block_size = bs;
  layout.row_offsets.push_back(0);
  for (int64_t h = 0; h < dims.num_q_heads; ++h) {
    for (int64_t r = 0; r < nb; ++r) {
      for (int64_t c = 0; c <= r; ++c) {
        if (heads[h].grid[r * nb + c] != 0) layout.col_idx.push_back(static_cast<int32_t>(c));
      }
      layout.row_offsets.push_back(static_cast<int64_t>(layout.col_idx.size()));
    }
    selection.head_stats[h] = heads[h].stats;
  }
  return selection;
}

template <typename T>
FlexPrefillHeadScores flex_prefill_head_scores(const T* q, const T* k,
                                               const SparseAttentionDims& dims,
                                               const FlexPrefillParams& params, int64_t head) {
  constexpr const char* kWho = "flex_prefill_head_scores";
  check_sparse_attention_dims(dims, kWho);
  check_flex_prefill_params(params);
  MF_CHECK(dims.seq_len >= params.block_size, "{}: seq_len must be >= block_size={}, got {}", kWho,
           params.block_size, dims.seq_len);
  return head_scores(q, k, checked_head_k_means(q, k, dims, params, head, kWho), dims, params,
                     head);
}

template <typename T>
std::vector<double> flex_prefill_block_probabilities(const T* q, const T* k,
                                                     const SparseAttentionDims& dims,
                                                     const FlexPrefillParams& params,
                                                     int64_t head) {
  constexpr const char* kWho = "flex_prefill_block_probabilities";
  check_sparse_attention_dims(dims, kWho);
  check_flex_prefill_params(params);
  MF_CHECK(dims.seq_len >= 1, "{}: seq_len must be >= 1, got {}", kWho, dims.seq_len);
  return block_probabilities(q, checked_head_k_means(q, k, dims, params, head, kWho), dims,
                             params.block_size, head);
}

template FlexPrefillSelection flex_prefill_select<float>(const float*, const float*,
                                                         const SparseAttentionDims&,
                                                         const FlexPrefillParams&);
template FlexPrefillSelection flex_prefill_select<double>(const double*, const double*,
                                                          const SparseAttentionDims&,
                                                          const FlexPrefillParams&);

template FlexPrefillHeadScores flex_prefill_head_scores<float>(const float*, const float*,
                                                               const SparseAttentionDims&,
                                                               const FlexPrefillParams&, int64_t);
template FlexPrefillHeadScores flex_prefill_head_scores<double>(const double*, const double*,
                                                                const SparseAttentionDims&,
                                                                const FlexPrefillParams&, int64_t);

template std::vector<double> flex_prefill_block_probabilities<float>(const float*, const float*,
                                                                     const SparseAttentionDims&,
                                                                     const FlexPrefillParams&,
                                                                     int64_t);
template std::vector<double> flex_prefill_block_probabilities<double>(const double*, const double*,
                                                                      const SparseAttentionDims&,
                                                                      const FlexPrefillParams&,
                                                                      int64_t);

}  // namespace moeforge::ops
