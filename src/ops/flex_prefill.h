// FlexPrefill pattern search (reference): per query head and per input, the causal block set that
// block_sparse_attention_forward then computes (arXiv 2502.20766; docs/flexprefill.md, whose
// steps 0-8 and the reference code's selection semantics this follows).
//
// One sequence (batch 1, as the reference), prefill (queries and keys of the same length N), GQA
// (query head h reads KV head h / (num_q_heads / num_kv_heads)), any head_dim > 0. With
// bs = block_size, nb = ceil(N / bs), minB = ceil(min_budget / bs),
// maxB = min(ceil(max_budget / bs), nb) (nb when max_budget <= 0):
//  0. Dense fallback: if N <= max(2 * bs, minB * bs) every causal block is selected
//     (dense_fallback = true; head stats: query_aware false, js_distance NaN, budgets 0).
//  1. A = softmax(Qh K^T / sqrt(D)) for the last bs queries of the head (causal: query N-bs+r sees
//     keys 0..N-bs+r). vertical[j] = sum_r A[r, j] / bs; slash[i] = sum_r A[r, i+r-(bs-1)] / bs.
//  2. Budget of vertical (and of slash): c = 1 + #{t : t-th cumulative sum of the values sorted
//     descending <= gamma}; blocks = c / 128 + 1 (128 fixed, as in the reference, whatever bs);
//     clamped to [minB, maxB].
//  3. vertical_blk, slash_blk: sums over blocks of bs (the last block over its real length).
//  4. abar = softmax_c(mean_r(Qh[r]) / sqrt(D) . Kbar[c]) over all nb blocks (Kbar: mean of the
//     block's real keys); d = sqrt(JS(abar, vertical_blk)), natural logs, 0 log 0 = 0, the JS
//     sum clamped at 0 before the root. d < tau: query-aware head, both budgets become minB.
//  5. vertical_blk[0] = slash_blk[nb-1] = +inf (first key block, main diagonal always kept).
//  6. Top-k: the nV largest vertical_blk give key-block columns, the nS largest slash_blk give
//     offsets s = nb-1-index.
//  7. Columns give (r, c) for all r >= c; offsets give (r, r - s) for all r >= s; union.
//  8. Query-aware heads: Qbar[r] = mean of the block's real queries / sqrt(D);
//     P[r, :] = softmax over c <= r of Qbar[r] . Kbar[c]; the causal entries sorted descending are
//     kept while their cumulative sum stays <= gamma * nb, and joined to the set.
//
// Ties (every sort and top-k above): the larger value first, equal values by the lower index
// (the index into vertical_blk / slash_blk; the flat index r * nb + c in step 8). Thus among
// equal slash scores the farther diagonal wins.
// Precision: all arithmetic in double, sums in ascending index order (rows r ascending in step 1),
// whatever T; the reference computes in fp32, so decisions that sit exactly on a threshold may
// differ from it.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/block_sparse_attention.h"

namespace moeforge::ops {

struct FlexPrefillParams {
  double gamma = 0.9;         // coverage, in (0, 1]
  double tau = 0.1;           // query-aware threshold on the JS distance, >= 0 (0: never)
  int64_t min_budget = 1024;  // tokens, >= 1
  int64_t max_budget = 0;     // tokens, <= 0: unlimited; otherwise >= min_budget
  int64_t block_size = 128;   // 64 or 128
};

struct FlexPrefillHeadStats {
  bool query_aware = false;
  double js_distance = 0.0;         // d of step 4
  int64_t num_vertical_blocks = 0;  // nV used in step 6
  int64_t num_slash_blocks = 0;     // nS used in step 6
  int64_t num_selected_blocks = 0;  // blocks of the head's final set
  double density = 0.0;             // num_selected_blocks / (nb (nb + 1) / 2), in (0, 1]
};

struct FlexPrefillSelection {
  bool dense_fallback = false;
  BlockSparseLayout layout;                      // the selected blocks of every query head
  std::vector<FlexPrefillHeadStats> head_stats;  // [num_q_heads]
};

// Throws moeforge::Error naming the field if gamma, tau, the budgets or block_size are invalid.
void check_flex_prefill_params(const FlexPrefillParams& params);

// q [seq_len, num_q_heads, head_dim]; k [seq_len, num_kv_heads, head_dim]; seq_len >= 1.
// Throws moeforge::Error on invalid params or dims, or a non-finite entry of q or k.
template <typename T>
FlexPrefillSelection flex_prefill_select(const T* q, const T* k, const SparseAttentionDims& dims,
                                         const FlexPrefillParams& params);

}  // namespace moeforge::ops
