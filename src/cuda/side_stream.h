// A second stream for work that may run beside the caller's stream (the FlexPrefill fast search's
// means beside its tensor-core passes): one per host thread and device, created on first use and
// kept for the thread's lifetime, with the two events that order it. It has the device's highest
// priority: where its blocks and the caller's wait for the same SMs, its blocks start first (the
// fast search's means, which its head decision waits for, then finish under the passes' cover
// instead of after them).
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

// Orders `stream` behind what the side stream of this thread and the current device has enqueued.
void join_side_stream(cudaStream_t stream);

}  // namespace moeforge::cuda
