// Tests of local_rank_from_environment: no launcher, each variable, their priority, bad values.
#include "comm/local_rank.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"

namespace moeforge {
namespace {

constexpr const char* kVariables[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                                      "SLURM_LOCALID", "LOCAL_RANK"};

// Unsets the launcher variables for the test and restores them afterwards.
class LocalRankTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : kVariables) {
      const char* value = std::getenv(name);
      saved_.emplace_back(name, value == nullptr ? std::string() : std::string(value),
                          value != nullptr);
      unsetenv(name);
    }
  }
  void TearDown() override {
    for (const auto& [name, value, was_set] : saved_) {
      if (was_set) {
        setenv(name, value.c_str(), 1);
      } else {
        unsetenv(name);
      }
    }
  }

 private:
  std::vector<std::tuple<const char*, std::string, bool>> saved_;
};

TEST_F(LocalRankTest, NoLauncherGivesMinusOne) {
  EXPECT_EQ(local_rank_from_environment(), -1);
}

TEST_F(LocalRankTest, EachVariableIsRead) {
  int expected = 2;
  for (const char* name : kVariables) {
    setenv(name, std::to_string(expected).c_str(), 1);
    EXPECT_EQ(local_rank_from_environment(), expected) << name;
    unsetenv(name);
    ++expected;
  }
}

TEST_F(LocalRankTest, OpenMpiWinsOverTheOthers) {
  setenv("LOCAL_RANK", "5", 1);
  setenv("SLURM_LOCALID", "4", 1);
  EXPECT_EQ(local_rank_from_environment(), 4);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  EXPECT_EQ(local_rank_from_environment(), 1);
}

TEST_F(LocalRankTest, BadValuesNameTheVariable) {
  for (const char* bad : {"", "x", "-1", "2a", "99999999999"}) {
    setenv("SLURM_LOCALID", bad, 1);
    try {
      local_rank_from_environment();
      ADD_FAILURE() << "no error for \"" << bad << "\"";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("SLURM_LOCALID"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace moeforge
