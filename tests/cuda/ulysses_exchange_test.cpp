// The Ulysses exchange kernels on one GPU, with the all-to-all between n simulated ranks done by
// copies (chunk j of rank i's send buffer is chunk i of rank j's receive buffer): sequence ->
// heads must give each rank its heads over every rank's positions in order
// (model/transformer.cpp's exchange_heads is the spec), and heads -> sequence must give back the
// original tensors. Exact: copies only. Head counts and head dims with and without the 16-byte
// path, GQA (fewer KV heads), and the one-rank case.
#include "cuda/ulysses_exchange.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "cuda/bf16.h"
#include "cuda/device_memory.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

struct ExchangeCase {
  int64_t batch, seq, heads, kv_heads, head_dim, ranks;
};

// A distinct value per (rank, batch, position, head, dim), exactly representable in bf16.
float value_of(int64_t rank, int64_t b, int64_t t, int64_t head, int64_t j) {
  return static_cast<float>(((rank * 7 + b * 5 + t * 3 + head * 11 + j) % 251) - 125);
}

std::vector<bf16> local_tensor(const ExchangeCase& c, int64_t rank, int64_t heads, int64_t tag) {
  std::vector<float> x(static_cast<size_t>(c.batch * c.seq * heads * c.head_dim));
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t t = 0; t < c.seq; ++t) {
      for (int64_t hd = 0; hd < heads; ++hd) {
        for (int64_t j = 0; j < c.head_dim; ++j) {
          x[static_cast<size_t>(((b * c.seq + t) * heads + hd) * c.head_dim + j)] =
              value_of(rank, b, t, hd + tag, j);
        }
      }
    }
  }
  return to_bf16(x);
}

void check(const ExchangeCase& c) {
  const std::string what = "batch " + std::to_string(c.batch) + " seq " + std::to_string(c.seq) +
                           " heads " + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) +
                           " head_dim " + std::to_string(c.head_dim) + " ranks " +
                           std::to_string(c.ranks);
  SCOPED_TRACE(what);
  const UlyssesShape shape{c.batch, c.seq, c.head_dim, c.ranks};
  const auto n = static_cast<size_t>(c.ranks);
  // Per rank: local q and k (k with kv_heads), their heads-layout counterparts, send and receive.
  std::vector<DeviceBuffer<bf16>> q(n), k(n), q_heads(n), k_heads(n), send(n), recv(n);
  std::vector<std::vector<UlyssesTensor>> tensors(n);
  int64_t chunk = 0;
  for (size_t r = 0; r < n; ++r) {
    q[r].upload(local_tensor(c, static_cast<int64_t>(r), c.heads, 0));
    k[r].upload(local_tensor(c, static_cast<int64_t>(r), c.kv_heads, 1000));
    q_heads[r].resize(q[r].size());
    k_heads[r].resize(k[r].size());
    testing::fill_garbage(q_heads[r]);
    testing::fill_garbage(k_heads[r]);
    tensors[r] = {{q[r].data(), q_heads[r].data(), c.heads},
                  {k[r].data(), k_heads[r].data(), c.kv_heads}};
    chunk = ulysses_chunk(tensors[r], shape);
    send[r].resize(static_cast<size_t>(chunk) * n);
    recv[r].resize(static_cast<size_t>(chunk) * n);
  }
  const auto all_to_all = [&] {
    for (size_t i = 0; i < n; ++i) {
      for (size_t j = 0; j < n; ++j) {
        ASSERT_EQ(cudaMemcpy(recv[j].data() + i * chunk, send[i].data() + j * chunk,
                             static_cast<size_t>(chunk) * sizeof(bf16), cudaMemcpyDeviceToDevice),
                  cudaSuccess);
      }
    }
  };

  for (size_t r = 0; r < n; ++r) ulysses_pack_local(send[r].data(), tensors[r], shape, nullptr);
  testing::synchronize();
  all_to_all();
  for (size_t r = 0; r < n; ++r) ulysses_unpack_heads(recv[r].data(), tensors[r], shape, nullptr);
  testing::synchronize();
  // Rank m's heads tensor [batch, n * seq, heads / n, d]: position p = src * seq + t holds rank
  // src's values at t for the heads [m * heads / n, (m + 1) * heads / n).
  for (size_t m = 0; m < n; ++m) {
    for (const auto& [buffer, heads, tag] :
         {std::tuple<DeviceBuffer<bf16>*, int64_t, int64_t>{&q_heads[m], c.heads, 0},
          {&k_heads[m], c.kv_heads, 1000}}) {
      const std::vector<float> got = to_float(buffer->download());
      const int64_t local_heads = heads / c.ranks;
      for (int64_t b = 0; b < c.batch; ++b) {
        for (int64_t p = 0; p < c.ranks * c.seq; ++p) {
          for (int64_t hd = 0; hd < local_heads; ++hd) {
            for (int64_t j = 0; j < c.head_dim; ++j) {
              const int64_t src = p / c.seq, t = p % c.seq;
              const float want =
                  value_of(src, b, t, static_cast<int64_t>(m) * local_heads + hd + tag, j);
              const size_t at = static_cast<size_t>(
                  ((b * c.ranks * c.seq + p) * local_heads + hd) * c.head_dim + j);
              ASSERT_EQ(got[at], want) << "rank " << m << " tensor tag " << tag << " batch " << b
                                       << " position " << p << " head " << hd << " dim " << j;
            }
          }
        }
      }
    }
  }

  // And back: the local tensors, garbage first, are restored from the heads tensors.
  std::vector<std::vector<float>> originals(n);
  for (size_t r = 0; r < n; ++r) {
    originals[r] = to_float(q[r].download());
    testing::fill_garbage(q[r]);
    testing::fill_garbage(k[r]);
    ulysses_pack_heads(send[r].data(), tensors[r], shape, nullptr);
  }
  testing::synchronize();
  all_to_all();
  for (size_t r = 0; r < n; ++r) ulysses_unpack_local(recv[r].data(), tensors[r], shape, nullptr);
  testing::synchronize();
  for (size_t r = 0; r < n; ++r) {
    const std::vector<float> got_q = to_float(q[r].download()), got_k = to_float(k[r].download());
    const std::vector<float> want_k =
        to_float(local_tensor(c, static_cast<int64_t>(r), c.kv_heads, 1000));
    EXPECT_EQ(got_q, originals[r]) << "q of rank " << r;
    EXPECT_EQ(got_k, want_k) << "k of rank " << r;
  }
}

TEST(UlyssesExchange, SequenceToHeadsAndBack) {
  MF_REQUIRE_GPU();
  const ExchangeCase cases[] = {
      {2, 5, 4, 2, 8, 2},   // 16-byte runs
      {1, 3, 8, 4, 16, 4},  // four ranks
      {3, 4, 6, 3, 5, 3},   // odd head dim: the scalar path, three ranks
      {2, 7, 4, 4, 64, 2},  // no GQA
      {1, 6, 4, 2, 12, 1},  // one rank: a reordering-free copy
  };
  for (const ExchangeCase& c : cases) check(c);
}

TEST(UlyssesExchange, RejectsHeadsThatDoNotSplit) {
  const std::vector<UlyssesTensor> tensors = {{nullptr, nullptr, 6}};
  EXPECT_THROW(ulysses_chunk(tensors, UlyssesShape{1, 4, 8, 4}), Error);
  EXPECT_EQ(ulysses_chunk(tensors, UlyssesShape{2, 4, 8, 3}), 2 * 4 * 2 * 8);
}

}  // namespace
}  // namespace moeforge::cuda
