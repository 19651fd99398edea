// Shared inputs and helpers of the GPU FlexPrefill search tests (flex_prefill_test.cpp for the
// exact search, flex_prefill_fp32_test.cpp and flex_prefill_fp32_blocks_test.cpp for the fp32
// one): shapes, parameters, bf16-valued q and k with query-aware and vertical-slash heads, a head's
// selected blocks as a grid, and step 8's logits with the fp32 search's error bound on them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "gpu_test_util.h"
#include "ops/block_sparse_attention.h"
#include "ops/flex_prefill.h"

// Its own namespace: the test binary links every tests/cuda file, and another helper header
// (attention_test_util.h) defines a different testing::Inputs, so sharing that namespace broke
// the one-definition rule (its destructor ran on these Inputs: a host segfault on the H200).
namespace moeforge::cuda::testing::flex {

struct Case {
  int64_t seq_len, num_q_heads, num_kv_heads, head_dim, block_size;
};

inline std::string describe(const Case& c) {
  return "N=" + std::to_string(c.seq_len) + " Hq=" + std::to_string(c.num_q_heads) +
         " Hkv=" + std::to_string(c.num_kv_heads) + " D=" + std::to_string(c.head_dim) +
         " bs=" + std::to_string(c.block_size);
}

inline ops::SparseAttentionDims dims_of(const Case& c) {
  return {c.seq_len, c.num_q_heads, c.num_kv_heads, c.head_dim};
}

inline ops::FlexPrefillParams params_of(const Case& c, double gamma, double tau) {
  ops::FlexPrefillParams params;
  params.gamma = gamma;
  params.tau = tau;
  params.min_budget = c.block_size;
  params.block_size = c.block_size;
  return params;
}

// bf16-valued q and k (as floats) with two kinds of heads: even query heads read nearly flat
// attention (query-aware under tau = 0.1: JS distance about 0.07-0.1), odd ones attend strongly to
// 8 "sink" keys that the block means hide (vertical-slash: JS distance about 0.25-0.4).
struct Inputs {
  std::vector<float> q, k;
};

inline Inputs make_inputs(const Case& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t d = c.head_dim;
  Inputs in;
  in.q.resize(c.seq_len * c.num_q_heads * d);
  in.k.resize(c.seq_len * c.num_kv_heads * d);
  for (int64_t n = 0; n < c.seq_len; ++n) {
    for (int64_t h = 0; h < c.num_q_heads; ++h) {
      float* row = in.q.data() + (n * c.num_q_heads + h) * d;
      for (int64_t i = 0; i < d; ++i) row[i] = static_cast<float>(0.5 * rng.normal());
      if (h % 2 == 1) row[0] += static_cast<float>(6.0 * std::sqrt(d / 64.0));
    }
  }
  for (float& v : in.k) v = static_cast<float>(rng.normal());
  for (int sink = 0; sink < 8; ++sink) {
    const int64_t n = static_cast<int64_t>(rng.below(static_cast<uint64_t>(c.seq_len)));
    for (int64_t g = 0; g < c.num_kv_heads; ++g) in.k[(n * c.num_kv_heads + g) * d] += 8.0f;
  }
  in.q = round_to_bf16(in.q);
  in.k = round_to_bf16(in.k);
  return in;
}

// The selected blocks of head h as an [nb, nb] 0/1 grid.
inline std::vector<char> head_grid(const ops::BlockSparseLayout& layout, int64_t h) {
  const int64_t nb = layout.num_blocks;
  std::vector<char> grid(nb * nb, 0);
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t row = h * nb + r;
    for (int64_t i = layout.row_offsets[row]; i < layout.row_offsets[row + 1]; ++i) {
      grid[r * nb + layout.col_idx[i]] = 1;
    }
  }
  return grid;
}

// Each head's num_selected_blocks (and density) against the blocks its CSR rows hold.
inline void expect_head_totals_match_layout(const ops::FlexPrefillSelection& sel) {
  const ops::BlockSparseLayout& layout = sel.layout;
  const int64_t nb = layout.num_blocks;
  const double num_causal = static_cast<double>(nb * (nb + 1) / 2);
  ASSERT_EQ(static_cast<int64_t>(sel.head_stats.size()), layout.num_heads);
  for (int64_t h = 0; h < layout.num_heads; ++h) {
    const int64_t blocks = layout.row_offsets[(h + 1) * nb] - layout.row_offsets[h * nb];
    EXPECT_EQ(sel.head_stats[h].num_selected_blocks, blocks) << "head " << h;
    EXPECT_EQ(sel.head_stats[h].density, static_cast<double>(blocks) / num_causal) << "head " << h;
  }
}

// Step 8's block logits of query head h, [nb, nb] row-major (c <= r used): `logit` the reference's
// (Qbar[r] . Kbar[c] in double, the block means as ops/flex_prefill.cpp forms them) and `bound`
// the fp32 search's error bound on each (cuda/flex_prefill_fp32.h, 8): E = k_E sum_d A[r, d]
// |Kbar[c, d]| with A[r, d] = (scale / length) sum_j |q[j, d]| over query block r, plus D 2^-126
// for fp32 products flushed to zero.
struct Step8Logits {
  std::vector<double> logit, bound;
};

inline Step8Logits step8_logits(const Inputs& in, const Case& c, int64_t h) {
  const int64_t d = c.head_dim, bs = c.block_size, n = c.seq_len;
  const int64_t nb = (n + bs - 1) / bs;
  const int64_t kv = h / (c.num_q_heads / c.num_kv_heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const double u = 0x1.0p-24;
  const auto gamma = [&](int64_t k) {
    return static_cast<double>(k) * u / (1.0 - static_cast<double>(k) * u);
  };
  const double k_q = (1.0 + gamma(bs - 1)) * (1.0 + u) * (1.0 + u) * (1.0 + 0x1.0p-52) - 1.0 +
                     static_cast<double>(bs + 2) * 0x1.0p-53;
  const double k_e =
      k_q * (1.0 + u) + u + gamma(d) * (1.0 + k_q) * (1.0 + u) + static_cast<double>(d) * 0x1.0p-52;
  std::vector<double> q_bar(nb * d, 0.0), a(nb * d, 0.0), k_bar(nb * d, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t b = j / bs;
    for (int64_t i = 0; i < d; ++i) {
      const double qv = in.q[(j * c.num_q_heads + h) * d + i];
      q_bar[b * d + i] += qv;
      a[b * d + i] += std::abs(qv);
      k_bar[b * d + i] += in.k[(j * c.num_kv_heads + kv) * d + i];
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    const auto length = static_cast<double>(std::min(bs, n - b * bs));
    for (int64_t i = 0; i < d; ++i) {
      q_bar[b * d + i] *= scale / length;
      a[b * d + i] *= scale / length;
      k_bar[b * d + i] *= 1.0 / length;
    }
  }
  Step8Logits out{std::vector<double>(nb * nb, 0.0), std::vector<double>(nb * nb, 0.0)};
  for (int64_t r = 0; r < nb; ++r) {
    for (int64_t col = 0; col <= r; ++col) {
      double logit = 0.0, weight = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        logit += q_bar[r * d + i] * k_bar[col * d + i];
        weight += a[r * d + i] * std::abs(k_bar[col * d + i]);
      }
      out.logit[r * nb + col] = logit;
      out.bound[r * nb + col] = k_e * weight + static_cast<double>(d) * 0x1.0p-126;
    }
  }
  return out;
}

}  // namespace moeforge::cuda::testing::flex
