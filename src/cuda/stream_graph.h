// A CUDA graph captured from the work one function enqueues on a stream, replayed with one launch,
// and ReplayedWork, the warm-up / capture / replay policy its users share.
// The device memory that work freed while it was captured (temporaries of the kernels' wrappers,
// DeviceBuffer::resize) stays reserved for the graph until the graph is destroyed, so no later
// allocation can take memory a replay still writes (DeviceAllocator::begin_hold).
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <memory>
#include <vector>

namespace moeforge::cuda {

class StreamGraph {
 public:
  // Runs enqueue() with `stream` capturing (relaxed mode: the allocator may still reach the
  // driver) and instantiates what it enqueued; nothing runs yet. enqueue may only enqueue work on
  // `stream` (or on streams forked from it by events) and must not synchronise or copy through the
  // legacy stream. Throws moeforge::Error with CUDA's reason when the capture fails; the stream
  // is no longer capturing then.
  StreamGraph(cudaStream_t stream, const std::function<void()>& enqueue);
  ~StreamGraph();
  StreamGraph(const StreamGraph&) = delete;
  StreamGraph& operator=(const StreamGraph&) = delete;

  // Enqueues one replay of the captured work on stream. The destructor waits for the last one,
  // so that stream must outlive the graph.
  void launch(cudaStream_t stream);
  // The nodes of the captured graph (kernels, copies, memsets).
  size_t num_nodes() const { return num_nodes_; }

 private:
  void release();

  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  std::vector<void*> held_;             // device blocks freed during the capture
  cudaStream_t launched_on_ = nullptr;  // the stream of the last launch
  size_t num_nodes_ = 0;
};

// One piece of stream work run the way CUDA graphs need: eagerly the first time (cuBLASLt, cuDNN
// and the grouped GEMMs size their workspaces on first use, which a capture must not allocate),
// captured into a StreamGraph the second time, replayed after that.
class ReplayedWork {
 public:
  // Enqueues the work on stream (eagerly, or by capturing or replaying its graph); true when this
  // call captured it.
  bool run(cudaStream_t stream, const std::function<void()>& enqueue);

 private:
  bool warmed_up_ = false;
  std::unique_ptr<StreamGraph> graph_;
};

}  // namespace moeforge::cuda
