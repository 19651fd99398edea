// Tests of ops::block_sparse_attention_forward: the full causal layout against
// ops::attention_forward, random block sets against a masked dense fp64 reference (output and
// log-sum-exp) over partial last blocks, GQA groups 1-8 and head dims 64/128, and the layout
// checks.
#include "ops/block_sparse_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/attention.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::random_vector;

struct Case {
  int64_t seq_len;
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;
};

std::string name(const Case& c) {
  return "N" + std::to_string(c.seq_len) + "_Hq" + std::to_string(c.num_q_heads) + "_Hkv" +
         std::to_string(c.num_kv_heads) + "_D" + std::to_string(c.head_dim) + "_bs" +
         std::to_string(c.block_size);
}

SparseAttentionDims dims_of(const Case& c) {
  return {c.seq_len, c.num_q_heads, c.num_kv_heads, c.head_dim};
}

// Each block strictly below the diagonal kept with probability 1/2, the diagonal always.
BlockSparseLayout random_layout(const Case& c, uint64_t seed) {
  BlockSparseLayout layout;
  layout.num_heads = c.num_q_heads;
  layout.num_blocks = (c.seq_len + c.block_size - 1) / c.block_size;
  layout.block_size = c.block_size;
  layout.row_offsets.push_back(0);
  const std::vector<double> coins =
      random_vector(c.num_q_heads * layout.num_blocks * layout.num_blocks, seed);
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    for (int64_t r = 0; r < layout.num_blocks; ++r) {
      for (int64_t col = 0; col <= r; ++col) {
        const double coin = coins[(h * layout.num_blocks + r) * layout.num_blocks + col];
        if (col == r || coin > 0.0) layout.col_idx.push_back(static_cast<int32_t>(col));
      }
      layout.row_offsets.push_back(static_cast<int64_t>(layout.col_idx.size()));
    }
  }
  return layout;
}

struct Reference {
  std::vector<double> out;  // [N, Hq, D]
  std::vector<double> lse;  // [Hq, N]
};

// Dense attention in fp64 with -inf on every score outside the selected blocks or above the
// diagonal; the log-sum-exp straight from the definition, log(sum_j exp(s_j)).
Reference masked_dense(const std::vector<double>& q, const std::vector<double>& k,
                       const std::vector<double>& v, const BlockSparseLayout& layout,
                       const Case& c) {
  const int64_t n = c.seq_len;
  const int64_t nb = layout.num_blocks;
  const int64_t d = c.head_dim;
  const int64_t group = c.num_q_heads / c.num_kv_heads;
  Reference ref{std::vector<double>(n * c.num_q_heads * d, 0.0),
                std::vector<double>(c.num_q_heads * n, 0.0)};
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    std::vector<char> allowed(nb * nb, 0);
    for (int64_t r = 0; r < nb; ++r) {
      for (int64_t e = layout.row_offsets[h * nb + r]; e < layout.row_offsets[h * nb + r + 1];
           ++e) {
        allowed[r * nb + layout.col_idx[e]] = 1;
      }
    }
    const int64_t g = h / group;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> scores(n, -INFINITY);
      for (int64_t j = 0; j <= i; ++j) {
        if (allowed[(i / c.block_size) * nb + j / c.block_size] == 0) continue;
        double s = 0.0;
        for (int64_t x = 0; x < d; ++x) {
          s += q[(i * c.num_q_heads + h) * d + x] * k[(j * c.num_kv_heads + g) * d + x];
        }
        scores[j] = s / std::sqrt(static_cast<double>(d));
      }
      double denom = 0.0;
      for (int64_t j = 0; j < n; ++j) denom += std::exp(scores[j]);
      ref.lse[h * n + i] = std::log(denom);
      for (int64_t j = 0; j < n; ++j) {
        const double p = std::exp(scores[j]) / denom;
        for (int64_t x = 0; x < d; ++x) {
          ref.out[(i * c.num_q_heads + h) * d + x] += p * v[(j * c.num_kv_heads + g) * d + x];
        }
      }
    }
  }
  return ref;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& x) {
  return std::vector<double>(x.begin(), x.end());
}

// Runs the op in T on inputs already representable in T and compares with the fp64 reference;
// the op accumulates in double, so the only error left is the final rounding to T.
template <typename T>
void check_against_masked_dense(const Case& c, const BlockSparseLayout& layout, uint64_t seed,
                                double tol) {
  const int64_t q_size = c.seq_len * c.num_q_heads * c.head_dim;
  const int64_t kv_size = c.seq_len * c.num_kv_heads * c.head_dim;
  const std::vector<T> q = cast<T>(random_vector(q_size, seed, 2.0));
  const std::vector<T> k = cast<T>(random_vector(kv_size, seed + 1, 2.0));
  const std::vector<T> v = cast<T>(random_vector(kv_size, seed + 2));
  std::vector<T> out(q_size);
  std::vector<T> lse(c.num_q_heads * c.seq_len);
  block_sparse_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), layout,
                                 dims_of(c));
  const Reference ref = masked_dense(to_double(q), to_double(k), to_double(v), layout, c);
  expect_close(to_double(out), ref.out, tol, tol, name(c) + "_out");
  expect_close(to_double(lse), ref.lse, tol, tol, name(c) + "_lse");
}

const std::vector<Case> kCases = {
    {200, 1, 1, 64, 64},   {333, 2, 1, 64, 64}, {333, 8, 1, 64, 64}, {200, 4, 2, 128, 64},
    {257, 6, 2, 128, 64},  {130, 8, 8, 64, 64}, {64, 3, 1, 64, 64},  {1, 2, 1, 64, 64},
    {300, 4, 1, 128, 128}, {100, 2, 2, 64, 16},
};

TEST(BlockSparseAttention, RandomLayoutsMatchMaskedDenseFloat) {
  uint64_t seed = 100;
  for (const Case& c : kCases) {
    SCOPED_TRACE(name(c));
    check_against_masked_dense<float>(c, random_layout(c, seed), seed, 2e-6);
    seed += 10;
  }
}

TEST(BlockSparseAttention, RandomLayoutsMatchMaskedDenseDouble) {
  uint64_t seed = 500;
  for (const Case& c : kCases) {
    SCOPED_TRACE(name(c));
    check_against_masked_dense<double>(c, random_layout(c, seed), seed, 1e-12);
    seed += 10;
  }
}

// Diagonal blocks only: every query sees just the keys of its own block up to itself.
TEST(BlockSparseAttention, DiagonalOnlyLayoutMatchesMaskedDense) {
  const Case c{333, 4, 2, 64, 64};
  BlockSparseLayout layout = random_layout(c, 7);
  layout.col_idx.clear();
  layout.row_offsets.assign(1, 0);
  for (int64_t h = 0; h < c.num_q_heads; ++h) {
    for (int64_t r = 0; r < layout.num_blocks; ++r) {
      layout.col_idx.push_back(static_cast<int32_t>(r));
      layout.row_offsets.push_back(static_cast<int64_t>(layout.col_idx.size()));
    }
  }
  check_against_masked_dense<double>(c, layout, 9, 1e-12);
}

template <typename T>
void check_full_layout_equals_dense(const Case& c, double tol) {
  const int64_t q_size = c.seq_len * c.num_q_heads * c.head_dim;
  const int64_t kv_size = c.seq_len * c.num_kv_heads * c.head_dim;
  const std::vector<T> q = cast<T>(random_vector(q_size, 31, 2.0));
  const std::vector<T> k = cast<T>(random_vector(kv_size, 32, 2.0));
  const std::vector<T> v = cast<T>(random_vector(kv_size, 33));
  std::vector<T> sparse_out(q_size);
  std::vector<T> dense_out(q_size);
  block_sparse_attention_forward(sparse_out.data(), static_cast<T*>(nullptr), q.data(), k.data(),
                                 v.data(), dense_causal_layout(c.num_q_heads, c.seq_len, 64),
                                 dims_of(c));
  const AttentionDims dense_dims{1,         c.seq_len, c.seq_len, c.num_q_heads, c.num_kv_heads,
                                 c.head_dim};
  attention_forward(dense_out.data(), static_cast<T*>(nullptr), q.data(), k.data(), v.data(),
                    dense_dims);
  expect_close(to_double(sparse_out), to_double(dense_out), tol, tol, name(c));
}

TEST(BlockSparseAttention, FullCausalLayoutEqualsDenseAttention) {
  for (const Case& c : {Case{333, 4, 2, 64, 64}, Case{200, 8, 1, 128, 64}}) {
    SCOPED_TRACE(name(c));
    check_full_layout_equals_dense<float>(c, 2e-6);
    check_full_layout_equals_dense<double>(c, 1e-12);
  }
}

TEST(BlockSparseAttention, RejectsInvalidLayouts) {
  const Case c{200, 2, 1, 64, 64};  // 4 blocks, the last one partial
  const std::vector<double> q(c.seq_len * c.num_q_heads * c.head_dim, 0.5);
  const std::vector<double> kv(c.seq_len * c.num_kv_heads * c.head_dim, 0.5);
  std::vector<double> out(q.size());
  auto run = [&](const BlockSparseLayout& layout) {
    block_sparse_attention_forward(out.data(), static_cast<double*>(nullptr), q.data(), kv.data(),
                                   kv.data(), layout, dims_of(c));
  };
  const BlockSparseLayout good = dense_causal_layout(c.num_q_heads, c.seq_len, c.block_size);
  EXPECT_NO_THROW(run(good));

  BlockSparseLayout no_diagonal = good;  // head 0, row 1: {0, 1} -> {0, 0}
  no_diagonal.col_idx[2] = 0;
  EXPECT_THROW(run(no_diagonal), Error);

  BlockSparseLayout non_causal = good;  // head 0, row 1: {0, 1} -> {0, 2}
  non_causal.col_idx[2] = 2;
  EXPECT_THROW(run(non_causal), Error);

  BlockSparseLayout unsorted = good;  // head 0, row 2: {0, 1, 2} -> {1, 0, 2}
  unsorted.col_idx[3] = 1;
  unsorted.col_idx[4] = 0;
  EXPECT_THROW(run(unsorted), Error);

  BlockSparseLayout empty_row = good;  // head 0, row 0 lists nothing
  empty_row.col_idx.erase(empty_row.col_idx.begin());
  for (size_t i = 1; i < empty_row.row_offsets.size(); ++i) --empty_row.row_offsets[i];
  EXPECT_THROW(run(empty_row), Error);

  BlockSparseLayout wrong_blocks = dense_causal_layout(c.num_q_heads, c.seq_len, 128);
  wrong_blocks.block_size = 64;
  EXPECT_THROW(run(wrong_blocks), Error);

  EXPECT_THROW(run(dense_causal_layout(c.num_q_heads + 1, c.seq_len, c.block_size)), Error);
}

// Flat block indices (the public FlexPrefill kernels' format) to CSR: any order and repeats give
// the sorted, merged rows; a full list gives the dense layout; the causal and diagonal rules hold.
TEST(BlockSparseAttention, LayoutFromFlatBlocks) {
  const int64_t heads = 2, seq = 200, bs = 64, nb = 4;  // the last block partial
  std::vector<int64_t> flat;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = nb - 1; r >= 0; --r) {
      for (int64_t c = 0; c <= r; ++c) flat.push_back(r * nb + c);
    }
  }
  const int64_t per_head = static_cast<int64_t>(flat.size()) / heads;
  const BlockSparseLayout dense = dense_causal_layout(heads, seq, bs);
  const BlockSparseLayout got =
      layout_from_flat_blocks(flat.data(), heads, per_head, seq, bs, "test");
  EXPECT_EQ(got.row_offsets, dense.row_offsets);
  EXPECT_EQ(got.col_idx, dense.col_idx);

  // Head 0: diagonals, (3, 0) twice and (2, 1); head 1: diagonals and (1, 0), listed backwards.
  const std::vector<int64_t> sparse = {0, 5, 10, 15, 12, 12, 9, 15, 10, 5, 4, 0, 0, 0};
  const BlockSparseLayout picked = layout_from_flat_blocks(sparse.data(), 2, 7, seq, bs, "test");
  EXPECT_EQ(picked.row_offsets, (std::vector<int64_t>{0, 1, 2, 4, 6, 7, 9, 10, 11}));
  EXPECT_EQ(picked.col_idx, (std::vector<int32_t>{0, 1, 1, 2, 0, 3, 0, 0, 1, 2, 3}));

  const auto error_of = [&](std::vector<int64_t> list) {
    try {
      layout_from_flat_blocks(list.data(), 1, static_cast<int64_t>(list.size()), seq, bs, "test");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error_of({0, 5, 10, 15, 7}).find("outside the causal triangle"), std::string::npos);
  EXPECT_NE(error_of({0, 5, 10, 15, 16}).find("outside the causal triangle"), std::string::npos);
  EXPECT_NE(error_of({0, 5, 10, 15, -1}).find("outside the causal triangle"), std::string::npos);
  EXPECT_NE(error_of({0, 5, 15, 8}), "");  // row 2 lacks its diagonal block
}

}  // namespace
}  // namespace moeforge::ops
