// The kernel timeline of cuda/kernel_timeline.h: its JSON lines (no GPU needed), and on the GPU the
// kernels and memsets of two streams with the runtime calls that launched them. A host function
// that sleeps holds one stream back, so its kernel must start that long after its launch call:
// the host's and the GPU's times are on one clock.
#include "cuda/kernel_timeline.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "cuda/bf16.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/random_fill.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

TEST(KernelTimeline, WritesOneTaggedLinePerEventFromTheEarliestStart) {
  // The earliest start is not the first event's: times count from it, in the events' order.
  const std::vector<TimelineEvent> events = {
      {TimelineEvent::Kind::kernel, "my_kernel(int)", 1, 7, 5000, 7250, 0, 9},
      {TimelineEvent::Kind::runtime, "cudaLaunchKernel_v7000", 0, 42, 1000, 3500, 0, 9},
      {TimelineEvent::Kind::memset, "memset", 1, 8, 4000, 4000, 4096, 10},
  };
  std::ostringstream out;
  write_timeline_jsonl(out, events, {{"seq", 8192}, {"part", "flex_select_fast"}});
  std::vector<nlohmann::json> lines;
  std::istringstream in(out.str());
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[1]["seq"], 8192);
  EXPECT_EQ(lines[1]["part"], "flex_select_fast");
  EXPECT_EQ(lines[1]["kind"], "runtime");
  EXPECT_EQ(lines[1]["stream"], 42);
  EXPECT_DOUBLE_EQ(lines[1]["start_us"].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(lines[1]["end_us"].get<double>(), 2.5);
  EXPECT_EQ(lines[0]["kind"], "kernel");
  EXPECT_EQ(lines[0]["name"], "my_kernel(int)");
  EXPECT_EQ(lines[0]["device"], 1);
  EXPECT_DOUBLE_EQ(lines[0]["start_us"].get<double>(), 4.0);
  EXPECT_DOUBLE_EQ(lines[0]["end_us"].get<double>(), 6.25);
  EXPECT_EQ(lines[0]["correlation"], 9);
  EXPECT_EQ(lines[2]["kind"], "memset");
  EXPECT_EQ(lines[2]["bytes"], 4096);

  std::ostringstream none;
  write_timeline_jsonl(none, {}, {{"seq", 1}});
  EXPECT_TRUE(none.str().empty());
}

constexpr auto kHold = std::chrono::milliseconds(50);  // how long a host function holds a stream

class KernelTimelineCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    MF_REQUIRE_GPU();
    if (!kernel_timeline_available()) GTEST_SKIP() << "built without CUPTI";
  }
};

// The runtime call with the given correlation id, or nullptr.
const TimelineEvent* launch_of(const std::vector<TimelineEvent>& events, uint32_t correlation) {
  for (const TimelineEvent& event : events) {
    if (event.kind == TimelineEvent::Kind::runtime && event.correlation == correlation) {
      return &event;
    }
  }
  return nullptr;
}

TEST_F(KernelTimelineCuda, RecordsTwoStreamsKernelsMemsetsAndTheirLaunches) {
  constexpr int64_t kCount = int64_t{1} << 20;
  DeviceBuffer<bf16> a(kCount), b(kCount);
  DeviceBuffer<uint8_t> bytes(4096);
  cudaStream_t first = nullptr, second = nullptr;
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&first, cudaStreamNonBlocking));
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&second, cudaStreamNonBlocking));
  std::vector<TimelineEvent> events;
  {
    KernelTimeline timeline;
    fill_uniform_bf16(a.data(), kCount, 1, 1.0f, first);
    MF_CUDA_CHECK(cudaMemsetAsync(bytes.data(), 0, 4096, second));
    MF_CUDA_CHECK(cudaLaunchHostFunc(
        second, [](void*) { std::this_thread::sleep_for(kHold); }, nullptr));
    fill_uniform_bf16(b.data(), kCount, 2, 1.0f, second);
    events = timeline.finish();
  }
  MF_CUDA_CHECK(cudaStreamDestroy(first));
  MF_CUDA_CHECK(cudaStreamDestroy(second));

  std::vector<const TimelineEvent*> kernels, memsets;
  for (const TimelineEvent& event : events) {
    if (event.kind == TimelineEvent::Kind::kernel) kernels.push_back(&event);
    if (event.kind == TimelineEvent::Kind::memset) memsets.push_back(&event);
  }
  ASSERT_EQ(kernels.size(), 2u);
  ASSERT_EQ(memsets.size(), 1u);
  for (const TimelineEvent* kernel : kernels) {
    EXPECT_NE(kernel->name.find("fill_uniform_kernel"), std::string::npos) << kernel->name;
    EXPECT_LT(kernel->start_ns, kernel->end_ns);
    const TimelineEvent* launch = launch_of(events, kernel->correlation);
    ASSERT_NE(launch, nullptr) << "no runtime call launched " << kernel->name;
    EXPECT_NE(launch->name.find("Launch"), std::string::npos) << launch->name;
    EXPECT_LE(launch->start_ns, kernel->start_ns);
  }
  // Sorted by start: the first stream's kernel, then the memset, then the held-back kernel.
  const TimelineEvent& held = *kernels[1];
  EXPECT_NE(kernels[0]->stream, held.stream);
  EXPECT_EQ(memsets[0]->stream, held.stream);
  EXPECT_EQ(memsets[0]->bytes, 4096u);
  EXPECT_LE(memsets[0]->end_ns, held.start_ns);
  const TimelineEvent* held_launch = launch_of(events, held.correlation);
  ASSERT_NE(held_launch, nullptr);
  const auto hold_ns = static_cast<uint64_t>(std::chrono::nanoseconds(kHold).count());
  EXPECT_GE(held.start_ns, held_launch->end_ns + hold_ns * 8 / 10)
      << "the held-back kernel started before the host function could have returned";
}

TEST_F(KernelTimelineCuda, RecordsOneAtATimeAndFinishesOnce) {
  KernelTimeline first;
  EXPECT_THROW(KernelTimeline(), Error);
  first.finish();
  EXPECT_THROW(first.finish(), Error);
  KernelTimeline second;  // the first one's end frees the recorder
  EXPECT_NO_THROW(second.finish());
}

}  // namespace
}  // namespace moeforge::cuda
