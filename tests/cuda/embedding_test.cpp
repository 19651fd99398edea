// Token embedding on the GPU: group_tokens on the host (no GPU needed), the forward as an exact
// copy of table rows, and the backward against ops/embedding.h in fp64 (accumulating into a
// nonzero dtable, deterministic, rows of absent tokens untouched).
#include "cuda/embedding.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "gpu_test_util.h"
#include "ops/embedding.h"

namespace moeforge::cuda {
namespace {

using testing::expect_close;
using testing::expect_equal;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

// Checks that groups lists every position exactly once, under its token, ascending within each
// group, with distinct non-empty groups (the order of the groups is not part of the contract).
void expect_valid_groups(const std::vector<int32_t>& tokens, const TokenGroups& groups) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const size_t num_unique = groups.token_ids.size();
  ASSERT_EQ(groups.offsets.size(), num_unique + 1);
  ASSERT_EQ(groups.positions.size(), tokens.size());
  EXPECT_EQ(groups.offsets.front(), 0);
  EXPECT_EQ(groups.offsets.back(), n);
  std::map<int32_t, std::vector<int32_t>> expected;  // token -> its positions, ascending
  for (int64_t i = 0; i < n; ++i) expected[tokens[i]].push_back(static_cast<int32_t>(i));
  ASSERT_EQ(num_unique, expected.size()) << "one group per distinct token";
  for (size_t g = 0; g < num_unique; ++g) {
    const int32_t token = groups.token_ids[g];
    ASSERT_TRUE(expected.count(token))
        << "group " << g << " has token " << token << ", which is not in the input";
    ASSERT_LE(groups.offsets[g], groups.offsets[g + 1]);
    const std::vector<int32_t> positions(groups.positions.begin() + groups.offsets[g],
                                         groups.positions.begin() + groups.offsets[g + 1]);
    EXPECT_EQ(positions, expected[token]) << "positions of token " << token;
  }
}

TEST(GroupTokens, GroupsPositionsByToken) {
  const std::vector<int32_t> tokens = {5, 2, 5, 7, 2, 5, 0};
  const TokenGroups groups = group_tokens(tokens.data(), static_cast<int64_t>(tokens.size()));
  expect_valid_groups(tokens, groups);
  EXPECT_EQ(groups.token_ids.size(), 4u);
}

TEST(GroupTokens, HandlesRandomTokensAndEmptyInput) {
  const std::vector<int32_t> tokens = testing::random_ints(257, 1, 50);
  expect_valid_groups(tokens, group_tokens(tokens.data(), 257));
  const std::vector<int32_t> repeated(100, 49999);
  expect_valid_groups(repeated, group_tokens(repeated.data(), 100));
  const std::vector<int32_t> none;
  const TokenGroups empty = group_tokens(none.data(), 0);
  EXPECT_TRUE(empty.token_ids.empty());
  EXPECT_TRUE(empty.positions.empty());
  EXPECT_EQ(empty.offsets, std::vector<int32_t>{0});
}

TEST(GroupTokens, PaddingAddsEmptyGroupsAtTheEnd) {
  const std::vector<int32_t> tokens = {5, 2, 5, 7};
  TokenGroups groups = group_tokens(tokens.data(), 4);
  const TokenGroups unpadded = groups;
  pad_token_groups(groups, 6);
  ASSERT_EQ(groups.token_ids.size(), 6u);
  ASSERT_EQ(groups.offsets.size(), 7u);
  EXPECT_EQ(std::vector<int32_t>(groups.token_ids.begin(), groups.token_ids.begin() + 3),
            unpadded.token_ids);
  EXPECT_EQ(std::vector<int32_t>(groups.offsets.begin(), groups.offsets.begin() + 4),
            unpadded.offsets);
  EXPECT_EQ(groups.offsets[4], 4);
  EXPECT_EQ(groups.offsets[5], 4);
  EXPECT_EQ(groups.offsets[6], 4);
  EXPECT_EQ(groups.positions, unpadded.positions);
  EXPECT_THROW(pad_token_groups(groups, 2), Error);
}

struct EmbeddingCase {
  int64_t vocab, hidden, n;
};

const EmbeddingCase kCases[] = {{1000, 96, 257}, {50257, 64, 100}, {7, 100, 1}};

std::vector<int32_t> case_tokens(const EmbeddingCase& ec, uint64_t seed) {
  // Few distinct tokens (many repeats) in the small vocabulary; both ends of the range.
  const int64_t num_drawn = ec.vocab < 2000 ? std::min<int64_t>(ec.vocab, 50) : ec.vocab;
  std::vector<int32_t> tokens = testing::random_ints(ec.n, seed, num_drawn);
  tokens[0] = static_cast<int32_t>(ec.vocab - 1);
  if (ec.n > 1) tokens[1] = 0;
  return tokens;
}

TEST(EmbeddingCuda, ForwardCopiesTableRowsExactly) {
  MF_REQUIRE_GPU();
  uint64_t seed = 1;
  for (const EmbeddingCase& ec : kCases) {
    SCOPED_TRACE("vocab=" + std::to_string(ec.vocab) + " hidden=" + std::to_string(ec.hidden));
    const std::vector<float> table = testing::random_normal(ec.vocab * ec.hidden, seed++);
    const std::vector<int32_t> tokens = case_tokens(ec, seed++);
    std::vector<float> out_ref(ec.n * ec.hidden);
    ops::embedding_forward<float>(out_ref.data(), tokens.data(), table.data(), ec.n, ec.hidden);

    DeviceBuffer<float> table_dev = to_device(table), out(ec.n * ec.hidden);
    DeviceBuffer<int32_t> tokens_dev = to_device(tokens);
    testing::fill_garbage(out);
    embedding_forward(out.data(), tokens_dev.data(), table_dev.data(), ec.n, ec.hidden, nullptr);
    testing::synchronize();
    expect_equal("out", out.download(), out_ref);
  }
}

TEST(EmbeddingCuda, BackwardAccumulatesDeterministically) {
  MF_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const EmbeddingCase& ec : kCases) {
    SCOPED_TRACE("vocab=" + std::to_string(ec.vocab) + " hidden=" + std::to_string(ec.hidden));
    const std::vector<float> dtable_start = testing::random_normal(ec.vocab * ec.hidden, seed++);
    const std::vector<float> dout = testing::random_normal(ec.n * ec.hidden, seed++);
    const std::vector<int32_t> tokens = case_tokens(ec, seed++);

    std::vector<double> dtable_ref = to_double(dtable_start);
    const std::vector<double> dout_d = to_double(dout);
    ops::embedding_backward<double>(dtable_ref.data(), dout_d.data(), tokens.data(), ec.n,
                                    ec.hidden);
    // fp32 sums of the rows of each token: count + 1 roundings of at most sum |term| each.
    std::vector<double> mag(dtable_start.size()), count(ec.vocab, 0.0);
    for (size_t i = 0; i < mag.size(); ++i) mag[i] = std::abs(dtable_start[i]);
    for (int64_t i = 0; i < ec.n; ++i) {
      count[tokens[i]] += 1.0;
      for (int64_t j = 0; j < ec.hidden; ++j)
        mag[tokens[i] * ec.hidden + j] += std::abs(dout_d[i * ec.hidden + j]);
    }
    std::vector<double> noise(mag.size());
    for (size_t i = 0; i < mag.size(); ++i) {
      noise[i] = (count[i / ec.hidden] + 2.0) * kFloatEps * mag[i];
    }

    const TokenGroups groups = group_tokens(tokens.data(), ec.n);
    DeviceBuffer<int32_t> token_ids = to_device(groups.token_ids),
                          offsets = to_device(groups.offsets),
                          positions = to_device(groups.positions);
    DeviceBuffer<float> dout_dev = to_device(dout);
    std::vector<std::vector<float>> results;
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer<float> dtable = to_device(dtable_start);
      embedding_backward(dtable.data(), dout_dev.data(), token_ids.data(), offsets.data(),
                         positions.data(), static_cast<int64_t>(groups.token_ids.size()), ec.hidden,
                         nullptr);
      testing::synchronize();
      results.push_back(dtable.download());
    }
    expect_close("dtable", to_double(results[0]), dtable_ref, noise);
    expect_equal("dtable of two runs", results[1], results[0]);
    // Rows of tokens that do not occur are left exactly as they were.
    std::vector<float> absent_rows, absent_rows_start;
    for (int64_t t = 0; t < ec.vocab; ++t) {
      if (count[t] > 0) continue;
      const size_t begin = static_cast<size_t>(t * ec.hidden), end = begin + ec.hidden;
      absent_rows.insert(absent_rows.end(), results[0].begin() + begin, results[0].begin() + end);
      absent_rows_start.insert(absent_rows_start.end(), dtable_start.begin() + begin,
                               dtable_start.begin() + end);
    }
    expect_equal("dtable rows of absent tokens", absent_rows, absent_rows_start);
  }
}

// Empty groups (pad_token_groups, of token 0, which occurs in the batch) change nothing, bit for
// bit, however many blocks they add beside the one that owns token 0's row.
TEST(EmbeddingCuda, BackwardSkipsPaddingGroups) {
  MF_REQUIRE_GPU();
  const EmbeddingCase ec = kCases[0];
  const std::vector<float> dtable_start = testing::random_normal(ec.vocab * ec.hidden, 7);
  const std::vector<float> dout = testing::random_normal(ec.n * ec.hidden, 8);
  const std::vector<int32_t> tokens = case_tokens(ec, 9);
  ASSERT_EQ(tokens[1], 0);
  TokenGroups groups = group_tokens(tokens.data(), ec.n);
  std::vector<std::vector<float>> results;
  for (const size_t num_groups : {groups.token_ids.size(), size_t{8192}}) {
    pad_token_groups(groups, num_groups);
    DeviceBuffer<int32_t> token_ids = to_device(groups.token_ids),
                          offsets = to_device(groups.offsets),
                          positions = to_device(groups.positions);
    DeviceBuffer<float> dout_dev = to_device(dout), dtable = to_device(dtable_start);
    embedding_backward(dtable.data(), dout_dev.data(), token_ids.data(), offsets.data(),
                       positions.data(), static_cast<int64_t>(num_groups), ec.hidden, nullptr);
    testing::synchronize();
    results.push_back(dtable.download());
  }
  expect_equal("dtable with 8192 groups, most of them empty", results[1], results[0]);
}

}  // namespace
}  // namespace moeforge::cuda
