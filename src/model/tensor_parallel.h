// The two ways a group of n ranks splits each decoder layer (ParallelLayout), and the pieces of
// the second one, Megatron-LM's tensor parallelism: the baseline of MegaScale-MoE's ablation
// (../shared/docs/megascale-moe.md, "TP+TP" against "SP+EP"; issue #7).
//
// Both layouts shard the residual stream along the sequence the same way: rank r holds positions
// [r * seq, (r + 1) * seq) of each of the batch's sequences, so the data path, the loss and the
// trainer do not depend on the layout. Under "tp" (Megatron-LM with --sequence-parallel: norms and
// residual adds on the local positions) every rank holds all weights (the checkpoint layout), uses
// its slice of the tensor-parallel ones and computes a partial gradient of them:
// - attention: all-gather the normed input along the sequence -> column-parallel q/k/v (rank r
//   owns query heads [r H / n, (r + 1) H / n) and KV heads [r KV / n, (r + 1) KV / n): rows of
//   q/k/v_proj and of their biases) -> q/k norm and RoPE at the full sequence's positions ->
//   causal attention over the full sequences on its heads -> row-parallel o_proj (its heads'
//   columns of W_o) -> reduce-scatter along the sequence (the sum of the partial outputs);
// - MoE: all-gather the normed tokens -> the router (replicated) on all of them, identically on
//   every rank -> every expert on its slice [r f / n, (r + 1) f / n) of the intermediate dimension
//   (rows of gate/up, columns of down), the shared expert likewise -> the gate-weighted partial
//   sums -> reduce-scatter (model/moe_ffn.h);
// - dense FFN: all-gather -> column-parallel gate/up, row-parallel down on the slice of
//   intermediate_size -> reduce-scatter.
// The backward mirrors each: all-gather of the output gradient, reduce-scatter of the input
// gradient. Under "sp_ep" attention is Ulysses sequence parallelism and the MoE layers are expert
// parallel (model/transformer.h, model/moe_ffn.h).
//
// Communication per layer and rank, forward + backward, in elements a rank sends to the others
// (an all-gather or reduce-scatter of c elements per rank: (n - 1) c, as a ring sends them; an
// all-to-all with chunks of c: (n - 1) c; an all-reduce of c: (n - 1) c, c to each other rank).
// N = b s / n local tokens of hidden size h, q = num_heads x head_dim, kv = num_kv_heads x
// head_dim, k = top-k:
//   layout  attention                MoE (all-gather dispatch)      dense FFN
//   tp      4 (n - 1) N h            4 (n - 1) N h + (n - 1) n N k  4 (n - 1) N h
//   sp_ep   4 (n - 1) N (q + kv) / n 4 (n - 1) N h + (n - 1) n N k  0
// In the forward of a layer (and again in its backward) the all-gather and reduce-scatter of tp
// move 2 (n - 1) N h = 2 b s h (n - 1) / n, megascale-moe.md's TP volume; Ulysses' all-to-alls
// move (n - 1) / n of q, k, v and the output: with q = h and kv = h / m, that is
// (n - 1) N h (2 + 2 / m) / n, (1 + 1 / m) / n of tp (0.156 at n = 8, m = 4; megascale-moe.md's
// SP expression is twice this count, its ratio 0.31). The MoE all-reduce is of the gate
// gradients (under tp every rank holds a partial sum of each, under sp_ep a part); a tp layer with
// a gated shared expert adds (n - 1) n N for the gate scores' gradients. The all-to-all dispatch
// of sp_ep moves 4 h x (kept assignments to other ranks' experts) plus routing counts
// (model/moe_ffn.h). Each forward adds the loss's all-reduce of 2 doubles (cross-entropy sum and
// count).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace moeforge {

enum class ParallelLayout {
  kSequenceExpert,  // "sp_ep": MegaScale-MoE's Ulysses attention and expert-parallel MoE
  kTensor,          // "tp": Megatron-LM's tensor parallelism with sequence-parallel norms
};

// "sp_ep" or "tp"; throws naming the accepted values otherwise.
ParallelLayout parse_parallel_layout(const std::string& name);
std::string parallel_layout_name(ParallelLayout layout);

// All-gather along the sequence: full [batch, n * seq, width] (assign) from every rank's local
// [batch, seq, width], rank r's at positions [r * seq, (r + 1) * seq). scratch is reused.
template <typename T>
void all_gather_sequences(T* full, const T* local, int64_t batch, int64_t seq, int64_t width,
                          Communicator& group, std::vector<T>& scratch);

// Reduce-scatter along the sequence: local [batch, seq, width] (assign) = this rank's positions of
// the sum over the group of full [batch, n * seq, width]. scratch is reused.
template <typename T>
void reduce_scatter_sequences(T* local, const T* full, int64_t batch, int64_t seq, int64_t width,
                              Communicator& group, std::vector<T>& scratch);

// A block of columns of a row-major matrix: [begin, begin + width) of [rows, cols]. A rank's slice
// of a row-parallel weight ([out, in], the columns of its inputs), or of a stack of column-parallel
// expert weights viewed as [num_experts, out * in].
struct ColumnSlice {
  int64_t rows;
  int64_t cols;
  int64_t begin;
  int64_t width;
};

// packed [rows, width] (assign) = matrix[:, begin : begin + width].
template <typename T>
void pack_columns(T* packed, const T* matrix, const ColumnSlice& slice);

// matrix[:, begin : begin + width] += packed [rows, width].
template <typename T>
void add_packed_columns(T* matrix, const T* packed, const ColumnSlice& slice);

}  // namespace moeforge
