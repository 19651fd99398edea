// A gtest listener for tests that run on several ranks: reports failures of ranks other than 0
// (whose output the default printer shows) and ends the whole job on a fatal failure, since that
// rank skipped collectives the others are waiting in.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>

#include "comm/communicator.h"

namespace moeforge {

class RankFailureListener : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailureListener(int rank_idx) : rank_idx_(rank_idx) {}

  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    if (rank_idx_ != 0) {
      std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_idx_,
                   result.file_name() ? result.file_name() : "?", result.line_number(),
                   result.message());
    }
    if (result.fatally_failed()) {
      std::fprintf(stderr, "[rank %d] fatal failure: aborting all ranks\n", rank_idx_);
      abort_world(1);
    }
  }

 private:
  int rank_idx_;
};

// Installs the listener and keeps the default printer on rank 0 only.
inline void install_rank_failure_listener(int rank_idx) {
  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank_idx != 0) delete listeners.Release(listeners.default_result_printer());
  listeners.Append(new RankFailureListener(rank_idx));
}

}  // namespace moeforge
