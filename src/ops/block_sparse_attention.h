// Causal block-sparse grouped-query attention (reference) over a per-query-head set of
// (query block, key block) pairs stored as CSR; also returns the log-sum-exp of each query row.
//
// One sequence (batch 1), queries and keys of the same length seq_len (prefill). The sequence is
// cut into num_blocks = ceil(seq_len / block_size) blocks; the last one may be partial. Query head
// h reads KV head h / (num_q_heads / num_kv_heads). Scale 1/sqrt(head_dim). Query position i (in
// query block r = i / block_size) attends to the keys j <= i of the key blocks listed for row
// (h, r): the causal mask applies inside the diagonal block. Every row must list its diagonal
// block, so every query sees at least itself.
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge::ops {

struct SparseAttentionDims {
  int64_t seq_len;  // query and key positions of the one sequence
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
};

// Selected blocks, one CSR row per (query head h, query block r), row index h * num_blocks + r:
// its key blocks are col_idx[row_offsets[row] .. row_offsets[row + 1]), strictly ascending,
// each <= r, the last one == r (the diagonal block).
struct BlockSparseLayout {
  int64_t num_heads = 0;   // query heads
  int64_t num_blocks = 0;  // ceil(seq_len / block_size)
  int64_t block_size = 0;
  std::vector<int64_t> row_offsets;  // [num_heads * num_blocks + 1], row_offsets[0] == 0
  std::vector<int32_t> col_idx;      // [row_offsets.back()]
};

// Throws moeforge::Error naming `what` if a field of dims is out of range.
void check_sparse_attention_dims(const SparseAttentionDims& dims, const char* what);

// Throws moeforge::Error naming `what` and the offending row unless layout has the shape above
// for num_heads query heads over seq_len positions.
void check_block_sparse_layout(const BlockSparseLayout& layout, int64_t num_heads, int64_t seq_len,
                               const char* what);

// Every causal block (c <= r) of every head: block-sparse attention over it is dense attention.
BlockSparseLayout dense_causal_layout(int64_t num_heads, int64_t seq_len, int64_t block_size);

// The layout of per-head lists of flat block indices r * num_blocks + c (the block-index format
// of the public FlexPrefill kernels): flat [num_heads, per_head], in any order, repeats merged.
// Throws moeforge::Error naming `what` for an index outside the causal block triangle, or a row
// without its diagonal block (check_block_sparse_layout's rules).
BlockSparseLayout layout_from_flat_blocks(const int64_t* flat, int64_t num_heads, int64_t per_head,
                                          int64_t seq_len, int64_t block_size, const char* what);

// q [seq_len, num_q_heads, head_dim]; k, v [seq_len, num_kv_heads, head_dim]
// out [seq_len, num_q_heads, head_dim] (assign); lse [num_q_heads, seq_len] (assign; may be null):
// natural-log log-sum-exp of the scaled scores q.k / sqrt(head_dim) over the keys row i attends to.
// Scores, softmax and the weighted sum run in double in a fixed order (two passes per row).
template <typename T>
void block_sparse_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                                    const BlockSparseLayout& layout,
                                    const SparseAttentionDims& dims);

}  // namespace moeforge::ops
