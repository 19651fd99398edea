// Causal block-sparse attention on the CPU: one (query head, query position) row at a time, over
// the keys of the row's selected key blocks; dot products, softmax and sums in double.
#include "ops/block_sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/dot.h"

namespace moeforge::ops {

void check_sparse_attention_dims(const SparseAttentionDims& d, const char* what) {
  MF_CHECK(d.seq_len >= 0, "{}: seq_len must be non-negative, got {}", what, d.seq_len);
  MF_CHECK(d.num_kv_heads > 0 && d.num_q_heads > 0,
           "{}: head counts must be positive, got num_q_heads={} num_kv_heads={}", what,
           d.num_q_heads, d.num_kv_heads);
  MF_CHECK(d.num_q_heads % d.num_kv_heads == 0,
           "{}: num_q_heads={} is not divisible by num_kv_heads={}", what, d.num_q_heads,
           d.num_kv_heads);
  MF_CHECK(d.head_dim > 0, "{}: head_dim must be positive, got {}", what, d.head_dim);
}

void check_block_sparse_layout(const BlockSparseLayout& layout, int64_t num_heads, int64_t seq_len,
                               const char* what) {
  MF_CHECK(layout.block_size > 0, "{}: layout.block_size must be positive, got {}", what,
           layout.block_size);
  const int64_t num_blocks = (seq_len + layout.block_size - 1) / layout.block_size;
  MF_CHECK(layout.num_heads == num_heads && layout.num_blocks == num_blocks,
           "{}: layout is for {} heads x {} blocks, expected {} heads x {} blocks (seq_len {}, "
           "block_size {})",
           what, layout.num_heads, layout.num_blocks, num_heads, num_blocks, seq_len,
           layout.block_size);
  const int64_t num_rows = num_heads * num_blocks;
  MF_CHECK(static_cast<int64_t>(layout.row_offsets.size()) == num_rows + 1,
           "{}: layout.row_offsets has {} entries, expected num_heads * num_blocks + 1 = {}", what,
           layout.row_offsets.size(), num_rows + 1);
  MF_CHECK(layout.row_offsets[0] == 0 &&
               layout.row_offsets[num_rows] == static_cast<int64_t>(layout.col_idx.size()),
           "{}: layout.row_offsets must run from 0 to col_idx.size()={}, got {} .. {}", what,
           layout.col_idx.size(), layout.row_offsets[0], layout.row_offsets[num_rows]);
  for (int64_t row = 0; row < num_rows; ++row) {
    const int64_t begin = layout.row_offsets[row];
    const int64_t end = layout.row_offsets[row + 1];
    const int64_t head = row / num_blocks;
    const int64_t q_block = row % num_blocks;
    MF_CHECK(begin < end && end <= static_cast<int64_t>(layout.col_idx.size()),
             "{}: head {} query block {} lists no key block (offsets {} .. {}); every row needs "
             "at least its diagonal block",
             what, head, q_block, begin, end);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t col = layout.col_idx[e];
      MF_CHECK(col >= 0 && col <= q_block && (e == begin || col > layout.col_idx[e - 1]),
               "{}: head {} query block {}: key block {} at position {} is not causal (0..{}) "
               "or not strictly ascending",
               what, head, q_block, col, e - begin, q_block);
    }
    MF_CHECK(layout.col_idx[end - 1] == q_block,
             "{}: head {} query block {} lacks its diagonal key block", what, head, q_block);
  }
}

BlockSparseLayout dense_causal_layout(int64_t num_heads, int64_t seq_len, int64_t block_size) {
  MF_CHECK(num_heads > 0 && seq_len >= 0 && block_size > 0,
           "dense_causal_layout: need num_heads > 0, seq_len >= 0, block_size > 0, got {}, {}, {}",
           num_heads, seq_len, block_size);
  BlockSparseLayout layout;
  layout.num_heads = num_heads;
  layout.num_blocks = (seq_len + block_size - 1) / block_size;
  layout.block_size = block_size;
  layout.row_offsets.push_back(0);
  for (int64_t h = 0; h < num_heads; ++h) {
    for (int64_t r = 0; r < layout.num_blocks; ++r) {
      for (int64_t c = 0; c <= r; ++c) layout.col_idx.push_back(static_cast<int32_t>(c));
      layout.row_offsets.push_back(static_cast<int64_t>(layout.col_idx.size()));
    }
  }
  return layout;
}

BlockSparseLayout layout_from_flat_blocks(const int64_t* flat, int64_t num_heads, int64_t per_head,
                                          int64_t seq_len, int64_t block_size, const char* what) {
  MF_CHECK(num_heads > 0 && per_head >= 0 && seq_len > 0 && block_size > 0,
           "{}: need num_heads > 0, per_head >= 0, seq_len > 0, block_size > 0, got {}, {}, {}, {}",
           what, num_heads, per_head, seq_len, block_size);
  const int64_t nb = (seq_len + block_size - 1) / block_size;
  BlockSparseLayout layout;
  layout.num_heads = num_heads;
  layout.num_blocks = nb;
  layout.block_size = block_size;
  layout.row_offsets.push_back(0);
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(nb));
  for (int64_t h = 0; h < num_heads; ++h) {
    for (auto& row : rows) row.clear();
    for (int64_t i = 0; i < per_head; ++i) {
      const int64_t index = flat[h * per_head + i];
      const int64_t r = index / nb, c = index % nb;
      MF_CHECK(index >= 0 && r < nb && c <= r,
               "{}: head {} lists block index {}, outside the causal triangle of {} x {} blocks",
               what, h, index, nb, nb);
      rows[static_cast<size_t>(r)].push_back(static_cast<int32_t>(c));
    }
    for (auto& row : rows) {
      std::sort(row.begin(), row.end());
      row.erase(std::unique(row.begin(), row.end()), row.end());
      layout.col_idx.insert(layout.col_idx.end(), row.begin(), row.end());
      layout.row_offsets.push_back(static_cast<int64_t>(layout.col_idx.size()));
    }
  }
  check_block_sparse_layout(layout, num_heads, seq_len, what);
  return layout;
}

template <typename T>
void block_sparse_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                                    const BlockSparseLayout& layout,
                                    const SparseAttentionDims& dims) {
  check_sparse_attention_dims(dims, "block_sparse_attention_forward");
  check_block_sparse_layout(layout, dims.num_q_heads, dims.seq_len,
                            "block_sparse_attention_forward");
  const int64_t seq_len = dims.seq_len;
  const int64_t num_q_heads = dims.num_q_heads;
  const int64_t head_dim = dims.head_dim;
  const int64_t block_size = layout.block_size;
  const int64_t group_size = num_q_heads / dims.num_kv_heads;
  const int64_t q_row = num_q_heads * head_dim;         // stride between positions of q and out
  const int64_t kv_row = dims.num_kv_heads * head_dim;  // stride between positions of k and v
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

#pragma omp parallel
  {
    std::vector<double> weights;  // scores, then softmax weights, of the attended keys
    std::vector<int64_t> key_idx;
    std::vector<double> acc(head_dim);
#pragma omp for collapse(2)
    for (int64_t h = 0; h < num_q_heads; ++h) {
      for (int64_t i = 0; i < seq_len; ++i) {
        const int64_t kv_head = h / group_size;
        const int64_t row = h * layout.num_blocks + i / block_size;
        const T* q_vec = q + i * q_row + h * head_dim;

        key_idx.clear();
        for (int64_t e = layout.row_offsets[row]; e < layout.row_offsets[row + 1]; ++e) {
          const int64_t first = layout.col_idx[e] * block_size;
          const int64_t last = std::min(first + block_size - 1, i);  // causal inside the block
          for (int64_t j = first; j <= last; ++j) key_idx.push_back(j);
        }
        weights.resize(key_idx.size());
        double max_score = -INFINITY;
        for (size_t e = 0; e < key_idx.size(); ++e) {
          weights[e] =
              scale * dot_double(q_vec, k + key_idx[e] * kv_row + kv_head * head_dim, head_dim);
          max_score = std::max(max_score, weights[e]);
        }
        double sum = 0.0;
        for (double& w : weights) {
          w = std::exp(w - max_score);
          sum += w;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (size_t e = 0; e < key_idx.size(); ++e) {
          const T* v_vec = v + key_idx[e] * kv_row + kv_head * head_dim;
          const double w = weights[e] / sum;
          for (int64_t d = 0; d < head_dim; ++d) acc[d] += w * static_cast<double>(v_vec[d]);
        }
        T* out_vec = out + i * q_row + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) out_vec[d] = static_cast<T>(acc[d]);
        if (lse != nullptr) lse[h * seq_len + i] = static_cast<T>(max_score + std::log(sum));
      }
    }
  }
}

template void block_sparse_attention_forward<float>(float*, float*, const float*, const float*,
                                                    const float*, const BlockSparseLayout&,
                                                    const SparseAttentionDims&);
template void block_sparse_attention_forward<double>(double*, double*, const double*, const double*,
                                                     const double*, const BlockSparseLayout&,
                                                     const SparseAttentionDims&);

}  // namespace moeforge::ops
