// Steps 1-3 of the GPU FlexPrefill pattern search in its fp32 form (ops::FlexSearch::kFp32, the
// CLI's `--flex-search fast`): the vertical / slash values on tensor cores and in fp32, their block
// scores, and step 2's coverage counts. Steps 4-7 are the exact ones (cuda/flex_prefill_stages.h)
// applied to these scores; step 8 has fp32 logits and its own coverage walk (see 8 below).
//
// What is computed (cuda/flex_prefill_fp32_scores.cu, cuda/flex_prefill_fp32_passes_sm90.cu,
// cuda/flex_prefill_fp32.cu, cuda/flex_prefill_fp32_blocks.cu):
//  1. x[r, j] = (q_r . k_j) * (scale * log2 e), the dot product on bf16 tensor cores with fp32
//     accumulation (mma.sync m16n8k16, or wgmma m64n64k16 on Hopper: Fp32Passes below), the
//     factor rounded to fp32 and applied by the FFMA that forms each exponent's argument; pass 1
//     keeps per row and key split the running max and the fp32 sum of 2^(x - max) (rescaled when
//     the max grows), pass 2 combines the splits in double into lse2[r] = log2 sum_j 2^x[r, j]
//     (rounded to fp32), recomputes the products and takes p = 2^(x - lse2) in fp32 (exp2_flush:
//     ex2.approx.ftz). The logits never reach global memory. vertical[j] = (sum_r p[r, j]) / bs and
//     slash[i] = (sum_r p[r, i + r - (bs - 1)]) / bs in fp32, in a fixed order (deterministic; a
//     tree of depth below bs).
//  3. vertical_blk, slash_blk: each block's fp32 values summed in double.
//  2. For the heads that step 4 finds not query-aware (the others' budgets are min_budget), each
//     kind's values in 2^-52 fixed point, counted by the radix select of cuda/coverage_select.h
//     (no sort): c - 1 = #{t : S_t <= gamma T} with S_t the (exact, integer) sum of the t + 1
//     largest values and T the sum of all; T is 1 in exact arithmetic, and measuring against it
//     keeps every value at gamma = 1, as the reference.
//  8. Every head's block logits in fp32 (fp32_block_logits, beside the passes; step 8 keeps the
//     query-aware heads'): the block means of scale * q summed in fp32 (rows ascending) times
//     fp32(scale / length), dotted with the key blocks' means (the exact doubles of step 4 rounded
//     to fp32) by an fp32 FMA chain, d ascending; their row softmax in fp32 (fp32_block_softmax: e
//     = expf(x - max), the sum of the e in double, p = fp32(e * (1 / sum)) in double). Then the
//     same select replaces step 8's sort: those fp32 probabilities in 2^-52 fixed point, ordered by
//     their values (equal ones by position), kept while their fixed-point sum stays <= gamma T, T
//     their own total (nb in exact arithmetic: the reference's gamma nb).
//
// Error bound (first order; u = 2^-24 the fp32 unit roundoff, u' = 2^-23 for the tensor cores'
// additions, which may truncate; X bounds |x| by Cauchy-Schwarz: X = scale log2(e) max_r |q_r|
// max_j |k_j|; n_tiles = kFp32SplitKeys / kFp32TileKeys rescales):
//  - dx = (D + 1) u' X + 2 u X bounds each logit's error (D + 1 fp32 additions of the exact bf16
//    products, then the rounded factor scale * log2 e and the rounded product);
//  - the row sum's relative error is eps_z = 2^-22 + 2 ln2 u X (each exp2: 2 ulps and its rounded
//    argument) + (kFp32TileKeys / 4 + 2 n_tiles + 2) u (its longest chain of additions and
//    rescales) + n_tiles (2^-22 + 2 ln2 u X) (the rescale factors);
//  - so each p has relative error rho_p = 2 ln2 dx (numerator and denominator) + eps_z +
//    ln2 u (3 X + 2 log2 N) (lse2 and x - lse2 rounded) + 2^-22 (the last exp2);
//  - a vertical or slash value, a sum of at most bs such p in a chain of at most bs + 4 additions,
//    has relative error rho = rho_p + (bs + 4) u (plus an absolute 2^-126 per term where fp32
//    flushes an underflowing p to zero); so does a block score (summed in double);
//  - the coverage S_t / T of the t largest values is within 2 rho of the reference's; the JS
//    distance's square within rho (its derivative in vertical_blk[c] is ln(vertical_blk[c] / m_c)
//    / 2, and |v ln(v / m)| <= 2 ln2 m); the top-k choice of block scores is the reference's except
//    for scores within a relative rho of the k-th largest;
//  - a step-8 logit is within E = k_E sum_d A[r, d] |kbar[c, d]| of the reference's, A[r, d] =
//    (scale / length) sum_j |q[j, d]| over the query block, k_E = k_q (1 + u) + u + gamma_D (1 +
//    k_q) (1 + u) + D 2^-52, k_q = (1 + gamma_{bs-1}) (1 + u)^2 (1 + 2^-52) - 1 + (bs + 2) 2^-53
//    (the fp32 sum and its two roundings, the key mean's rounding, the FMA chain, the reference's
//    own doubles); so the exact softmax of these logits is within a relative rho_8 = exp(2 E) - 1
//    of the reference's probabilities;
//  - the fp32 softmax of a row of len logits y of span W = max y - min y: each e = expf(fl(y -
//    max)) is within a relative rho_e = W u + 2^-22 of exp(y - max) (the rounded difference;
//    expf's 2 ulps), the double sum within (len - 1) 2^-53 more, the reciprocal and the product
//    2^-53 each, so each p before its rounding to fp32 is within rho_sm = 2 rho_e + (len + 1)
//    2^-53 of the exact softmax of y (an e below 2^-126, where fp32 loses precision, within
//    2^-147 absolute: expf's 2 ulps there and the rounding);
//  - step 8 keeps the reference's blocks except where that and the fp32 rounding (relative 2^-24 a
//    value) reorder values within a relative max(2^-22, (1 + r) / (1 - r) - 1), r = (1 + u)
//    (1 + rho_8) (1 + rho_sm) - 1, of each other or the cumulative sum lies within r (plus 2^-53 a
//    term) of gamma nb (tests/cuda/flex_prefill_fp32_test.cpp's step-8 band).
// tests/cuda/flex_prefill_fp32_test.cpp evaluates this bound and checks the selection against it.
//
// Limits (checked, moeforge::Error, after those of cuda/flex_prefill.h): head_dim a multiple of 8
// (16-byte rows for cp.async), q and k 16-byte aligned, a device of compute capability 8.0 or later
// whose blocks of threads may use fp32_scores_smem_bytes of shared memory (every head_dim on
// Hopper and the A100, up to 176 at block size 128 on sm_86 / sm_89).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/bf16.h"
#include "cuda/flex_prefill_stages.h"

namespace moeforge::cuda {

// Keys per tile of the tensor-core passes and per block of threads (split) of them.
constexpr int64_t kFp32TileKeys = 64;
constexpr int64_t kFp32SplitKeys = 1024;

// Bytes of shared memory per block of threads of the fp32 search's largest kernel (at most about
// 137 KB, at head_dim 256 and block size 128; 73 KB at head_dim 128).
size_t fp32_scores_smem_bytes(const flex::SearchShape& s);

// Throws moeforge::Error unless the fp32 search can run on these inputs (the limits above).
void check_fp32_search(const flex::SearchShape& s, const bf16* q, const bf16* k);

// Which kernels run step 1's two tensor-core passes (cuda/flex_prefill_fp32_passes.h): the Hopper
// ones where they can (automatic), or the ones named (Error where they cannot run). Tests compare
// both; the results of either meet the bound above.
enum class Fp32Passes { automatic, mma_sync, hopper };

// Steps 1 and 3: vs [Hq, 2, N] = the fp32 vertical (kind 0) and slash (kind 1) values; pooled
// [Hq, 2, nb] = their block sums, in double (cuda/flex_prefill_fp32_scores.cu).
void fp32_vertical_slash(float* vs, double* pooled, const bf16* q, const bf16* k,
                         const flex::SearchShape& s, cudaStream_t stream,
                         Fp32Passes passes = Fp32Passes::automatic);

// The key blocks' means for steps 4 and 8: k_means [Hkv, nb, D] = flex::block_means' doubles
// (factor 1, every head), by at most max_blocks blocks of threads (0: as many as the work has; the
// side stream's limit, cuda/side_stream.h), each small enough to fit an SM beside the tensor-core
// passes. Asynchronous on the stream.
void fp32_key_block_means(double* k_means, const bf16* k, const flex::SearchShape& s,
                          cudaStream_t stream, unsigned max_blocks);

// Step 8's query block means: q_means [Hq, nb, D] = each block's rows of q summed in fp32, rows
// ascending, times fp32(scale / length) (8 above), for heads whose flag in active is set (active
// null: every head); max_blocks and the blocks of threads as for fp32_key_block_means (the same
// values whatever the grid). Asynchronous on the stream.
void fp32_q_block_means(float* q_means, const bf16* q, const int32_t* active,
                        const flex::SearchShape& s, cudaStream_t stream, unsigned max_blocks);

// Step 8's logits: tri [Hq, nb (nb + 1) / 2] at triangle position r (r + 1) / 2 + c (c <= r) = the
// fp32 logit of query block r and key block c (8 above), for heads whose flag in query_aware is
// set (query_aware null: every head; the fast search computes them beside its passes, before step
// 4 has decided which heads step 8 keeps); q_means as fp32_q_block_means gives them (for those
// heads at least), k_means [Hkv, nb, D] as flex::block_means gives them; by at most max_blocks
// blocks of threads (0: one per 64 x 64 tile of the triangle; the same values whatever the grid).
// Asynchronous on the stream.
void fp32_block_logits(float* tri, const float* q_means, const double* k_means,
                       const int32_t* query_aware, const flex::SearchShape& s, cudaStream_t stream,
                       unsigned max_blocks);
// Step 8's probabilities: each row of tri (as fp32_block_logits leaves it) replaced by its fp32
// softmax (8 above; within rho_sm of the exact one, then rounded), for heads whose flag in
// query_aware is set (null: every head); the other heads' rows keep what they held. Asynchronous on
// the stream.
void fp32_block_softmax(float* tri, const int32_t* query_aware, const flex::SearchShape& s,
                        cudaStream_t stream);

// Step 2: coverage_counts [Hq, 2] = the counts c - 1 for vertical and slash of vs (as
// fp32_vertical_slash gives it), for the heads whose flag in query_aware is 0 (query_aware null:
// every head); the other heads' counts are left as they were: their budgets are min_budget
// whatever the counts. Asynchronous on the stream; workspace and path as coverage_select's
// (cuda/coverage_select.h) for 2 Hq segments (workspace null: its own).
void fp32_coverage_counts(unsigned long long* coverage_counts, const float* vs,
                          const flex::SearchShape& s, double gamma, const int32_t* query_aware,
                          cudaStream_t stream, void* workspace,
                          SelectPath path = SelectPath::automatic);

}  // namespace moeforge::cuda
