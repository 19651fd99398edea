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
//     descending <= gamma} (flex_prefill_coverage_prefix); blocks = c / 128 + 1 (128 fixed, as in
//     the reference, whatever bs); clamped to [minB, maxB].
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
//     kept while their cumulative sum stays <= gamma * nb (flex_prefill_coverage_prefix), and
//     joined to the set.
//
// Ties (every sort and top-k above): the larger value first, equal values by the lower index
// (the index into vertical_blk / slash_blk; the flat index r * nb + c in step 8). Thus among
// equal slash scores the farther diagonal wins.
//
// Precision and order: all arithmetic in double, whatever T. Dot products add their terms in
// ascending index order. Long sums use a chunked order, so that a GPU can parallelise them and
// still give the same doubles (C = kFlexPrefillSumChunk):
//  - every softmax denominator (step 1's rows over their N-bs+r+1 keys, step 4's abar, step 8's
//    rows) is flex_prefill_chunked_sum of the exponentials: the terms are cut into chunks of C
//    consecutive indices (chunk c holds indices [c C, (c + 1) C)), each chunk is summed in
//    ascending order from +0.0, and the chunk totals are summed in ascending chunk order from +0.0;
//  - every cumulative coverage (step 2 over the N sorted values, step 8 over the nb (nb + 1) / 2
//    sorted block probabilities) is flex_prefill_coverage_prefix: the cumulative sum at sorted
//    position t is base(t's chunk) + (the ascending sum of t's chunk from its start through t),
//    base(c) being the ascending sum of the totals of the chunks before c. All terms are >= 0 and
//    rounding is monotone, so the cumulative never decreases and "the entries while it stays <=
//    the limit" is a prefix of the sorted order.
// Every other sum (the rows r of vertical and slash, the bs entries of a pooled block or a block
// mean, the rows of the query mean, the JS terms: block c ascending, abar's term before
// vertical_blk's) runs sequentially in ascending index order.
// The reference computes in fp32 with its own order, so decisions that sit exactly on a threshold
// may differ from it.
//
// Exactness facts the GPU version (cuda/flex_prefill.h) relies on to give the same doubles:
//  - q and k hold bf16 values (T = float or double holding bf16 values): a product of two of them
//    is exact in double (8-bit significands, exponents far inside double's range), so a fused
//    multiply-add fma(q, k, s) equals the reference's round(q * k + s) with no contraction;
//  - products of two doubles (block means, the scaled query mean) are not exact, so those dot
//    products must be computed without fused multiply-adds;
//  - a max is exact in any order; adding +0.0 to a sum that is not -0.0 leaves it unchanged, and no
//    sum here is -0.0 (each starts at +0.0, and rounding to nearest gives -0.0 only for -0.0 +
//    -0.0), so masked entries may be added as zeros;
//  - the values that are sorted (probabilities, their sums, +inf) are never -0.0 or NaN when q
//    and k are finite.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/block_sparse_attention.h"

namespace moeforge::ops {

// How a device computes steps 1-2 (the CPU reference always computes them exactly, as above):
//  - kExact: the reference's doubles in the reference's order (cuda/flex_prefill.h), so the same
//    selection bit for bit;
//  - kFp32: an approximation for speed (cuda/flex_prefill_fp32.h). Step 1's logits on bf16 tensor
//    cores with fp32 accumulation, the softmax and the vertical / slash sums in fp32, and step 2's
//    coverage measured against the fp32 values' own total (1 in exact arithmetic, so that gamma = 1
//    keeps every value as the reference does). Steps 4-7 are the exact ones applied to the fp32
//    scores; step 8 computes the block probabilities from fp32 logits by an fp32 softmax and walks
//    their coverage in fixed point, against their own total (nb in exact arithmetic). Each
//    vertical / slash value, and so each pooled block score, is within a relative error rho of the
//    reference's (cuda/flex_prefill_fp32.h derives rho); decisions whose exact quantities lie
//    within that noise of their threshold (the JS distance near tau, a budget's coverage near
//    gamma, a block score near the top-k cut, a block probability near step 8's cut) may differ
//    from the reference's, all others are the reference's.
enum class FlexSearch { kExact, kFp32 };

struct FlexPrefillParams {
  double gamma = 0.9;         // coverage, in (0, 1]
  double tau = 0.1;           // query-aware threshold on the JS distance, >= 0 (0: never)
  int64_t min_budget = 1024;  // tokens, >= 1
  int64_t max_budget = 0;     // tokens, <= 0: unlimited; otherwise >= min_budget
  int64_t block_size = 128;   // 64 or 128
  FlexSearch search = FlexSearch::kExact;
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

// One query head's scores of steps 1, 3 and 4, as the reference computes them for its selection:
// what an approximate search (FlexSearch::kFp32) is checked against.
struct FlexPrefillHeadScores {
  std::vector<double> vertical;      // [N], step 1
  std::vector<double> slash;         // [N], step 1 (index N-1 = main diagonal)
  std::vector<double> vertical_blk;  // [nb], step 3 (before step 5 sets entry 0 to +inf)
  std::vector<double> slash_blk;     // [nb], step 3 (before step 5 sets entry nb-1 to +inf)
  double js_distance = 0.0;          // step 4
};

// Terms per chunk of the chunked sums (see the header comment).
constexpr int64_t kFlexPrefillSumChunk = 256;

// Sum of x[0..n) in the chunked order (chunks of kFlexPrefillSumChunk, see the header comment).
double flex_prefill_chunked_sum(const double* x, int64_t n);

// The number of leading entries of x[0..n) (values >= 0, sorted descending by the caller) whose
// chunked cumulative sum stays <= limit (see the header comment).
int64_t flex_prefill_coverage_prefix(const double* x, int64_t n, double limit);

// Throws moeforge::Error naming the field if gamma, tau, the budgets, block_size or search are
// invalid.
void check_flex_prefill_params(const FlexPrefillParams& params);

// "exact", or "fast" for FlexSearch::kFp32 (the values of the CLI's --flex-search).
const char* flex_search_name(FlexSearch search);

// q [seq_len, num_q_heads, head_dim]; k [seq_len, num_kv_heads, head_dim]; seq_len >= 1.
// Throws moeforge::Error on invalid params or dims, or a non-finite entry of q or k.
template <typename T>
FlexPrefillSelection flex_prefill_select(const T* q, const T* k, const SparseAttentionDims& dims,
                                         const FlexPrefillParams& params);

// The scores of query head `head` (0 <= head < num_q_heads), the same doubles flex_prefill_select
// computes. Needs seq_len >= block_size (step 1 reads the last block_size queries); the dense
// fallback is not applied. Throws moeforge::Error like flex_prefill_select.
template <typename T>
FlexPrefillHeadScores flex_prefill_head_scores(const T* q, const T* k,
                                               const SparseAttentionDims& dims,
                                               const FlexPrefillParams& params, int64_t head);

// Step 8's block probabilities of query head `head` (0 <= head < num_q_heads), the same doubles
// flex_prefill_select computes for a query-aware head: [nb, nb] row-major, P[r, c] for c <= r and
// -1 for c > r. Throws moeforge::Error like flex_prefill_select.
template <typename T>
std::vector<double> flex_prefill_block_probabilities(const T* q, const T* k,
                                                     const SparseAttentionDims& dims,
                                                     const FlexPrefillParams& params, int64_t head);

}  // namespace moeforge::ops
