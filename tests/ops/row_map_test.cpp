// Tests of the MoE row map on hand-made assignments: dropless order, capacity dropping of the
// latest tokens, expert sub-ranges and validation.
#include "ops/row_map.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"

namespace moeforge::ops {
namespace {

// 4 tokens, top-2, 3 experts.
// expert 0: (t0,s1) (t1,s0) (t3,s0); expert 1: (t1,s1) (t2,s0); expert 2: (t0,s0) (t2,s1) (t3,s1)
const std::vector<int32_t> kExpertIdx = {2, 0, 0, 1, 1, 2, 0, 2};

TEST(RowMap, DroplessOrderIsExpertThenTokenThenSlot) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, -1);
  EXPECT_EQ(map.expert_offsets, (std::vector<int64_t>{0, 3, 5, 8}));
  EXPECT_EQ(map.row_token, (std::vector<int32_t>{0, 1, 3, 1, 2, 0, 2, 3}));
  EXPECT_EQ(map.assignment_row, (std::vector<int32_t>{5, 0, 1, 3, 4, 6, 2, 7}));
  EXPECT_EQ(map.tokens_per_expert, (std::vector<int64_t>{3, 2, 3}));
  EXPECT_EQ(map.num_dropped, 0);
  EXPECT_EQ(map.num_rows(), 8);
  EXPECT_EQ(map.num_local_experts(), 3);
}

TEST(RowMap, SameExpertTwiceInOneTokenKeepsSlotOrder) {
  const std::vector<int32_t> idx = {1, 1, 0, 1};
  const RowMap map = build_row_map(idx.data(), 2, 2, 0, 2, -1);
  EXPECT_EQ(map.expert_offsets, (std::vector<int64_t>{0, 1, 4}));
  EXPECT_EQ(map.row_token, (std::vector<int32_t>{1, 0, 0, 1}));
  EXPECT_EQ(map.assignment_row, (std::vector<int32_t>{1, 2, 0, 3}));
}

TEST(RowMap, CapacityKeepsTheEarliestTokens) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, 2);
  EXPECT_EQ(map.expert_offsets, (std::vector<int64_t>{0, 2, 4, 6}));
  EXPECT_EQ(map.row_token, (std::vector<int32_t>{0, 1, 1, 2, 0, 2}));
  // Token 3 loses both of its assignments.
  EXPECT_EQ(map.assignment_row, (std::vector<int32_t>{4, 0, 1, 2, 3, 5, -1, -1}));
  EXPECT_EQ(map.tokens_per_expert, (std::vector<int64_t>{3, 2, 3}));
  EXPECT_EQ(map.num_dropped, 2);

  const RowMap none = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, 0);
  EXPECT_EQ(none.num_rows(), 0);
  EXPECT_EQ(none.num_dropped, 8);
  EXPECT_EQ(none.assignment_row, std::vector<int32_t>(8, -1));
}

TEST(RowMap, ExpertSubRangeMapsOnlyItsExperts) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 1, 3, -1);
  EXPECT_EQ(map.expert_offsets, (std::vector<int64_t>{0, 2, 5}));
  EXPECT_EQ(map.row_token, (std::vector<int32_t>{1, 2, 0, 2, 3}));
  EXPECT_EQ(map.assignment_row, (std::vector<int32_t>{2, -1, -1, 0, 1, 3, -1, 4}));
  EXPECT_EQ(map.tokens_per_expert, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(map.num_dropped, 0);

  // Capacity 1: dropped counts only the local experts' assignments (1 of expert 1, 2 of expert 2).
  const RowMap capped = build_row_map(kExpertIdx.data(), 4, 2, 1, 3, 1);
  EXPECT_EQ(capped.expert_offsets, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(capped.row_token, (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(capped.assignment_row, (std::vector<int32_t>{1, -1, -1, 0, -1, -1, -1, -1}));
  EXPECT_EQ(capped.num_dropped, 3);

  const RowMap empty = build_row_map(kExpertIdx.data(), 4, 2, 3, 3, -1);
  EXPECT_EQ(empty.expert_offsets, (std::vector<int64_t>{0}));
  EXPECT_EQ(empty.num_rows(), 0);
}

TEST(RowMap, ExpertCapacity) {
  EXPECT_EQ(expert_capacity(1.0, 8, 2, 4), 4);
  EXPECT_EQ(expert_capacity(1.25, 8, 2, 4), 5);
  EXPECT_EQ(expert_capacity(1.5, 3, 1, 2), 3);  // ceil(2.25)
  EXPECT_EQ(expert_capacity(0.0, 8, 2, 4), -1);
  EXPECT_EQ(expert_capacity(-1.0, 8, 2, 4), -1);
  EXPECT_THROW(expert_capacity(1.0, 8, 2, 0), Error);
}

TEST(RowMap, RejectsNegativeExpertIndexNamingTheToken) {
  const std::vector<int32_t> idx = {0, 1, 1, 0, 2, -1};
  try {
    build_row_map(idx.data(), 3, 2, 0, 3, -1);
    FAIL() << "a negative expert index was accepted";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("token 2"), std::string::npos) << message;
    EXPECT_NE(message.find("-1"), std::string::npos) << message;
  }
  EXPECT_THROW(build_row_map(kExpertIdx.data(), 4, 2, 2, 1, -1), Error);
  EXPECT_THROW(build_row_map(kExpertIdx.data(), 4, 0, 0, 3, -1), Error);
}

}  // namespace
}  // namespace moeforge::ops
