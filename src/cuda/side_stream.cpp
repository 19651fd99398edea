// The per-thread, per-device side stream of cuda/side_stream.h.
#include "cuda/side_stream.h"

#include <map>

#include "cuda/cuda_check.h"

namespace moeforge::cuda {
namespace {

struct Side {
  cudaStream_t stream = nullptr;
  cudaEvent_t forked = nullptr, done = nullptr;
  unsigned max_blocks = 0;  // side_stream_max_blocks()
};

// This thread's side streams by device. At thread exit they are destroyed without checks: the
// driver may already be shutting down.
class SideStreams {
 public:
  SideStreams() = default;
  SideStreams(const SideStreams&) = delete;
  SideStreams& operator=(const SideStreams&) = delete;
  ~SideStreams() {
    for (auto& [device, side] : sides_) {
      cudaEventDestroy(side.forked);
      cudaEventDestroy(side.done);
      cudaStreamDestroy(side.stream);
    }
  }

  Side& current() {
    int device = 0;
    MF_CUDA_CHECK(cudaGetDevice(&device));
    auto [it, inserted] = sides_.try_emplace(device);
    if (inserted) {
      Side& side = it->second;
      int greatest = 0;
      MF_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(nullptr, &greatest));
      MF_CUDA_CHECK(cudaStreamCreateWithPriority(&side.stream, cudaStreamNonBlocking, greatest));
      MF_CUDA_CHECK(cudaEventCreateWithFlags(&side.forked, cudaEventDisableTiming));
      MF_CUDA_CHECK(cudaEventCreateWithFlags(&side.done, cudaEventDisableTiming));
      int sms = 0;
      MF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      side.max_blocks = static_cast<unsigned>(sms * kSideBlocksPerSm);
    }
    return it->second;
  }

 private:
  std::map<int, Side> sides_;
};

Side& this_thread_side() {
  thread_local SideStreams sides;
  return sides.current();
}

}  // namespace

cudaStream_t fork_side_stream(cudaStream_t stream) {
  Side& side = this_thread_side();
  MF_CUDA_CHECK(cudaEventRecord(side.forked, stream));
  MF_CUDA_CHECK(cudaStreamWaitEvent(side.stream, side.forked, 0));
  return side.stream;
}

unsigned side_stream_max_blocks() {
  return this_thread_side().max_blocks;
}

void join_side_stream(cudaStream_t stream) {
  Side& side = this_thread_side();
  MF_CUDA_CHECK(cudaEventRecord(side.done, side.stream));
  MF_CUDA_CHECK(cudaStreamWaitEvent(stream, side.done, 0));
}

}  // namespace moeforge::cuda
