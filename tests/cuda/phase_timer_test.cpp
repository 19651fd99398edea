// PhaseTimer on the GPU: split() charges the work of a phase's exchanges to "<phase><suffix>" and
// reopens the phase, the totals cover every phase, and a disabled timer only runs the work.
#include "cuda/phase_timer.h"

#include <gtest/gtest.h>

#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/reductions.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

TEST(PhaseTimerCuda, SplitChargesTheExchangeAndReopensThePhase) {
  MF_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  MF_CUDA_CHECK(cudaStreamCreate(&stream));
  DeviceBuffer<float> x(1 << 20);
  x.fill_zero(stream);
  PhaseTimer timer;
  timer.set_enabled(true);
  int runs = 0;
  for (int step = 0; step < 2; ++step) {
    timer.mark("moe", stream);
    scale_inplace(x.data(), 2.0f, static_cast<int64_t>(x.size()), stream);
    timer.split("_exchange", stream, [&] {
      ++runs;
      add_inplace(x.data(), x.data(), static_cast<int64_t>(x.size()), stream);
    });
    scale_inplace(x.data(), 0.5f, static_cast<int64_t>(x.size()), stream);
    timer.mark("head", stream);
    scale_inplace(x.data(), 1.0f, static_cast<int64_t>(x.size()), stream);
    timer.flush(stream);
  }
  EXPECT_EQ(runs, 2);
  const auto& totals = timer.totals_ms();
  ASSERT_EQ(totals.size(), 3u);
  for (const char* phase : {"moe", "moe_exchange", "head"}) {
    ASSERT_TRUE(totals.contains(phase)) << phase;
    EXPECT_GT(totals.at(phase), 0.0) << phase;
  }
  // Disabled, or with no open phase: the work runs and nothing is timed.
  timer.reset();
  timer.split("_exchange", stream, [&] { ++runs; });
  timer.set_enabled(false);
  timer.mark("moe", stream);
  timer.split("_exchange", stream, [&] { ++runs; });
  timer.flush(stream);
  EXPECT_EQ(runs, 4);
  EXPECT_TRUE(timer.totals_ms().empty());
  MF_CUDA_CHECK(cudaStreamSynchronize(stream));
  MF_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace moeforge::cuda
