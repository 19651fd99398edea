// The shared main() of the NCCL test binaries, one GPU per rank: run alone (one rank) and under
// mpirun. Every test skips, on every rank, when some rank has no GPU of its own; with
// MOEFORGE_EXPECT_GPU=1 they fail instead when a rank sees no GPU at all. A test's first
// statement is MF_REQUIRE_NCCL_GPUS(); nccl() is the NCCL communicator over the world.
#pragma once

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/local_rank.h"
#include "comm/nccl/nccl_communicator.h"
#include "comm/rank_failure_listener.h"
#include "core/error.h"
#include "cuda/cuda_check.h"

namespace moeforge::testing {

// Why the GPU tests skip, the same on every rank; empty when every rank has a GPU of its own.
inline std::string& nccl_skip_reason() {
  static std::string reason;
  return reason;
}

// Whether some rank sees no GPU at all (a failure with MOEFORGE_EXPECT_GPU=1); more ranks than
// GPUs on a host (the 4-rank run on a 2-GPU machine) always skips.
inline bool& some_rank_has_no_gpu() {
  static bool no_gpu = false;
  return no_gpu;
}

inline bool nccl_fail_instead_of_skipping() {
  const char* expect = std::getenv("MOEFORGE_EXPECT_GPU");
  return some_rank_has_no_gpu() && expect != nullptr && std::string(expect) == "1";
}

// The NCCL communicator over the whole world, made in run_nccl_tests().
inline NcclCommunicator*& world_nccl() {
  static NcclCommunicator* comm = nullptr;
  return comm;
}

inline NcclCommunicator& nccl() {
  return *world_nccl();
}

// The body of main(): every rank agrees on whether the tests run (so that none waits in a
// collective the others skip), binds its GPU, joins the world's NCCL communicator and runs the
// tests. binary names the run in the line ctest's SKIP_REGULAR_EXPRESSION matches.
inline int run_nccl_tests(int argc, char** argv, const char* binary) {
  ::testing::InitGoogleTest(&argc, argv);
  Communicator& world = world_communicator();
  install_rank_failure_listener(world.rank());

  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess) {
    cudaGetLastError();
    device_count = 0;
  }
  const int local_rank = std::max(local_rank_from_environment(), 0);
  std::array<int32_t, 2> num_missing = {device_count == 0 ? 1 : 0,
                                        local_rank >= device_count ? 1 : 0};
  world.all_reduce_sum(num_missing.data(), num_missing.size());
  if (num_missing[0] > 0) {
    nccl_skip_reason() =
        fmt::format("{} of {} ranks see no CUDA device", num_missing[0], world.size());
    some_rank_has_no_gpu() = true;
  } else if (num_missing[1] > 0) {
    nccl_skip_reason() =
        fmt::format("{} of {} ranks have no GPU of their own (more ranks than GPUs)",
                    num_missing[1], world.size());
  }

  std::unique_ptr<NcclCommunicator> world_communicator_nccl;
  if (nccl_skip_reason().empty()) {
    try {
      MF_CUDA_CHECK(cudaSetDevice(local_rank));
      world_communicator_nccl = std::make_unique<NcclCommunicator>(world);
    } catch (const Error& error) {
      std::fprintf(stderr, "[rank %d] %s\n", world.rank(), error.what());
      abort_world(1);
    }
    world_nccl() = world_communicator_nccl.get();
  } else if (world.rank() == 0 && !nccl_fail_instead_of_skipping()) {
    // ctest reports the run as skipped on this line.
    std::printf("%s: %s: the NCCL tests are skipped\n", binary, nccl_skip_reason().c_str());
  }
  const int result = RUN_ALL_TESTS();
  world_nccl() = nullptr;
  world_communicator_nccl.reset();
  return result;
}

}  // namespace moeforge::testing

// First statement of every test that needs the GPUs.
#define MF_REQUIRE_NCCL_GPUS()                                  \
  do {                                                          \
    if (!::moeforge::testing::nccl_skip_reason().empty()) {     \
      if (::moeforge::testing::nccl_fail_instead_of_skipping()) \
        FAIL() << ::moeforge::testing::nccl_skip_reason();      \
      GTEST_SKIP() << ::moeforge::testing::nccl_skip_reason();  \
    }                                                           \
  } while (0)
