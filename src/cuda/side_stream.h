// A second stream for work that may run beside the caller's stream (the FlexPrefill fast search's
// means beside its tensor-core passes, its step 2 and top-k beside its step 8): one per host thread
// and device, created on first use and kept for the thread's lifetime, with the two events that
// order it. It has the device's highest priority: where its blocks and the caller's wait for the
// same SMs, its blocks start first (the fast search's means, which its head decision waits for,
// then finish under the passes' cover instead of after them).
//
// Footprint: the fast search's means kernels launch at most side_stream_max_blocks() blocks of
// threads (grid-stride loops), each small enough to fit an SM beside the tensor-core passes
// (cuda/flex_prefill_fp32_blocks.cu: 128 threads of at most 80 registers, no shared memory): pass
// 1's three blocks of threads leave an SM room for one, pass 2's two for two. A grid of many more
// at the side stream's priority takes whole SMs from the passes, so that the two streams take
// turns instead of sharing the SMs. Two per SM measured fastest of 1, 2 and 4 (docs/benchmarks.md,
// session 24). Step 2 and the top-k run beside small kernels and keep their own grids.
//
// Memory: the caching allocator (cuda/device_memory.h) is not stream-ordered, so buffers that side
// work uses must be allocated before fork_side_stream and freed after join_side_stream (the fork
// orders the side stream behind everything already on the caller's stream, the join the caller's
// stream behind the side work).
#pragma once

#include <cuda_runtime.h>

namespace moeforge::cuda {

// The side stream of this thread and the current device, ordered behind what `stream` has
// enqueued so far.
cudaStream_t fork_side_stream(cudaStream_t stream);

// Blocks of threads per SM that a side-stream kernel may launch.
constexpr int kSideBlocksPerSm = 2;

// The most blocks of threads a side-stream kernel launches: kSideBlocksPerSm per SM of the current
// device.
unsigned side_stream_max_blocks();

// Orders `stream` behind what the side stream of this thread and the current device has enqueued.
void join_side_stream(cudaStream_t stream);

}  // namespace moeforge::cuda
