// The host side of the all-to-all dispatch's device maps (cuda/moe_dispatch_a2a.h): pack_a2a_maps
// lays the plan's maps out one after another in A2aMapOffsets' order, within a2a_map_ints of the
// worst case, and refuses a buffer that is too small. Needs no GPU; the device part runs over NCCL
// in expert_parallel_mpitest.cpp (ExpertParallelA2aDispatch).
#include "cuda/moe_dispatch_a2a.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "model/moe_dispatch_a2a.h"

namespace moeforge::cuda {
namespace {

template <typename T>
std::vector<int32_t> as_int32(const std::vector<T>& values) {
  return std::vector<int32_t>(values.begin(), values.end());
}

std::vector<int32_t> region(const std::vector<int32_t>& packed, int64_t begin, int64_t end) {
  return std::vector<int32_t>(packed.begin() + begin, packed.begin() + end);
}

TEST(MoeDispatchA2aMaps, PacksThePlanOneMapAfterAnother) {
  constexpr int64_t kRanks = 2, kTokens = 10, kTopK = 2, kExperts = 6, kLocal = kExperts / kRanks;
  // Both ranks' routing: two distinct experts per token.
  Rng rng(7);
  std::vector<int32_t> routing;  // [ranks * tokens, top_k]
  std::vector<int64_t> loads(kRanks * kExperts, 0);
  for (int64_t t = 0; t < kRanks * kTokens; ++t) {
    const auto first = static_cast<int32_t>(rng.below(kExperts));
    const auto second = static_cast<int32_t>((first + 1 + rng.below(kExperts - 1)) % kExperts);
    for (const int32_t e : {first, second}) {
      routing.push_back(e);
      ++loads[t / kTokens * kExperts + e];
    }
  }
  const int64_t capacity = 5;
  const A2aDispatchPlan plan =
      plan_a2a_dispatch_from_loads(routing.data() + kTokens * kTopK, kTokens, kTopK, kExperts,
                                   capacity, loads.data(), 1, kRanks);
  const int64_t most = a2a_map_ints(kTokens * kTopK, kRanks * kTokens * kTopK, kLocal, kExperts);
  std::vector<int32_t> packed(static_cast<size_t>(most), -7);
  const A2aMapOffsets at = pack_a2a_maps(packed.data(), most, plan);

  EXPECT_EQ(at.send_row_token, 0);
  EXPECT_EQ(region(packed, at.send_row_token, at.send_assignment_row), plan.send_map.row_token);
  EXPECT_EQ(region(packed, at.send_assignment_row, at.recv_row_token),
            plan.send_map.assignment_row);
  EXPECT_EQ(region(packed, at.recv_row_token, at.recv_assignment_row), plan.recv_map.row_token);
  EXPECT_EQ(region(packed, at.recv_assignment_row, at.expert_offsets),
            plan.recv_map.assignment_row);
  EXPECT_EQ(region(packed, at.expert_offsets, at.group_load),
            as_int32(plan.recv_map.expert_offsets));
  EXPECT_EQ(region(packed, at.group_load, at.total), as_int32(plan.group_load));
  EXPECT_EQ(at.expert_offsets - at.recv_assignment_row, plan.recv_map.num_rows());
  EXPECT_EQ(at.group_load - at.expert_offsets, kLocal + 1);
  EXPECT_LE(at.total, most);
  for (int64_t i = at.total; i < most; ++i) ASSERT_EQ(packed[i], -7) << "written past the maps";
  EXPECT_GT(plan.num_dropped + plan.send_map.num_dropped, 0) << "the case must drop assignments";

  try {
    pack_a2a_maps(packed.data(), at.total - 1, plan);
    ADD_FAILURE() << "a buffer one int short passed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the buffer holds"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge::cuda
