// The decode-attention kernel against a double reference (ops/attention.h's definition over a
// cache) on the same bf16 inputs: cache lengths 1, 7, 300 and 5000 (one split, several splits,
// partial tiles), GQA groups 1 to 8 and 12 (two blocks per KV head), head dims 8, 64, 128 and 256,
// one query (decode) and several (a prefill continuing a cache), and peaked scores (the online
// softmax rescales). Bound (as the block-sparse attention test): the output is a convex
// combination of bf16 values of v accumulated in fp32 and rounded once to bf16, so |error| <= one
// bf16 ulp of the reference plus N * 2^-22 * max |v| for the fp32 sums and exp2 over N keys.
#include "cuda/decode_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::to_device;
using testing::to_double;

struct Case {
  int64_t num_queries, start, num_q_heads, num_kv_heads, head_dim;
  double q_scale = 1.0;
};

// out [num_queries, num_q_heads, head_dim]: query i over keys 0 .. start + i, in double.
std::vector<double> reference(const Case& c, const std::vector<double>& q,
                              const std::vector<double>& k, const std::vector<double>& v) {
  const int64_t d = c.head_dim, group = c.num_q_heads / c.num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(static_cast<size_t>(c.num_queries * c.num_q_heads * d), 0.0);
  for (int64_t i = 0; i < c.num_queries; ++i) {
    const int64_t num_keys = c.start + i + 1;
    for (int64_t h = 0; h < c.num_q_heads; ++h) {
      const int64_t kvh = h / group;
      const double* qi = q.data() + (i * c.num_q_heads + h) * d;
      std::vector<double> s(static_cast<size_t>(num_keys));
      double m = -INFINITY;
      for (int64_t j = 0; j < num_keys; ++j) {
        const double* kj = k.data() + (j * c.num_kv_heads + kvh) * d;
        double dot = 0.0;
        for (int64_t e = 0; e < d; ++e) dot += qi[e] * kj[e];
        s[static_cast<size_t>(j)] = dot * scale;
        m = std::max(m, s[static_cast<size_t>(j)]);
      }
      double sum = 0.0;
      for (double& x : s) sum += (x = std::exp(x - m));
      double* o = out.data() + (i * c.num_q_heads + h) * d;
      for (int64_t j = 0; j < num_keys; ++j) {
        const double* vj = v.data() + (j * c.num_kv_heads + kvh) * d;
        for (int64_t e = 0; e < d; ++e) o[e] += s[static_cast<size_t>(j)] / sum * vj[e];
      }
    }
  }
  return out;
}

void check_case(const Case& c, uint64_t seed) {
  const DecodeAttentionDims dims{c.num_queries, c.start, c.num_q_heads, c.num_kv_heads, c.head_dim};
  SCOPED_TRACE("queries=" + std::to_string(c.num_queries) + " start=" + std::to_string(c.start) +
               " Hq=" + std::to_string(c.num_q_heads) + " Hkv=" + std::to_string(c.num_kv_heads) +
               " D=" + std::to_string(c.head_dim) +
               " splits=" + std::to_string(decode_attention_num_splits(dims)));
  const int64_t num_keys = c.start + c.num_queries;
  const int64_t q_size = c.num_queries * c.num_q_heads * c.head_dim;
  const int64_t kv_size = num_keys * c.num_kv_heads * c.head_dim;
  const auto q = to_bf16(testing::random_normal(static_cast<size_t>(q_size), seed, c.q_scale));
  const auto k = to_bf16(testing::random_normal(static_cast<size_t>(kv_size), seed + 1, 1.0));
  const auto v = to_bf16(testing::random_normal(static_cast<size_t>(kv_size), seed + 2, 1.0));
  const std::vector<double> vd = to_double(v);
  const std::vector<double> want = reference(c, to_double(q), to_double(k), vd);

  DeviceBuffer<bf16> q_dev = to_device(q), k_dev = to_device(k), v_dev = to_device(v);
  DeviceBuffer<bf16> out(static_cast<size_t>(q_size));
  DeviceBuffer<float> workspace;
  testing::fill_garbage(out);
  decode_attention_forward(out.data(), q_dev.data(), k_dev.data(), v_dev.data(), dims, workspace,
                           nullptr);

  double max_v = 0.0;
  for (double x : vd) max_v = std::max(max_v, std::abs(x));
  const double sum_noise = static_cast<double>(num_keys) * 0x1.0p-22 * max_v;
  std::vector<double> bound(want.size());
  for (size_t i = 0; i < want.size(); ++i) bound[i] = testing::bf16_ulp(want[i]) + sum_noise;
  expect_close("output", download_double(out), want, bound);
}

TEST(DecodeAttentionCuda, OneQueryMatchesTheReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 10;
  for (const int64_t num_keys : {1, 7, 300, 5000}) {
    for (const int64_t group : {1, 2, 3, 4, 8}) {
      for (const int64_t head_dim : {64, 128}) {
        check_case(Case{1, num_keys - 1, 2 * group, 2, head_dim}, seed);
        seed += 10;
      }
    }
  }
}

TEST(DecodeAttentionCuda, OtherShapesMatchTheReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 500;
  for (const Case& c : {Case{1, 299, 12, 1, 64}, Case{1, 4999, 24, 2, 128}, Case{1, 130, 4, 2, 8},
                        Case{1, 700, 8, 1, 256}, Case{1, 40, 6, 6, 40},
                        Case{1, 5000, 8, 2, 128, 4.0}, Case{1, 300, 4, 1, 64, 6.0}}) {
    check_case(c, seed);
    seed += 10;
  }
}

TEST(DecodeAttentionCuda, SeveralQueriesContinueTheCache) {
  MF_REQUIRE_GPU();
  uint64_t seed = 900;
  for (const Case& c : {Case{5, 0, 4, 2, 64}, Case{7, 300, 8, 2, 128}, Case{130, 20, 4, 1, 64},
                        Case{3, 4997, 16, 2, 128}}) {
    check_case(c, seed);
    seed += 10;
  }
}

TEST(DecodeAttentionCuda, RejectsShapesItCannotRun) {
  MF_REQUIRE_GPU();
  DeviceBuffer<bf16> buffer(4096);
  DeviceBuffer<float> workspace;
  bf16* p = buffer.data();
  EXPECT_THROW(
      decode_attention_forward(p, p, p, p, DecodeAttentionDims{1, 0, 2, 1, 12}, workspace, nullptr),
      Error);
  EXPECT_THROW(
      decode_attention_forward(p, p, p, p, DecodeAttentionDims{1, 0, 3, 2, 64}, workspace, nullptr),
      Error);
  EXPECT_THROW(
      decode_attention_forward(p, p, p, p, DecodeAttentionDims{0, 4, 2, 1, 64}, workspace, nullptr),
      Error);
  EXPECT_THROW(decode_attention_forward(p, p, p, p, DecodeAttentionDims{1, 0, 2, 1, 512}, workspace,
                                        nullptr),
               Error);
}

}  // namespace
}  // namespace moeforge::cuda
