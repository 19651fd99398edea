// StreamGraph: stream capture into a cudaGraph_t, instantiation, replay, and the hold on the
// memory the captured work freed; ReplayedWork's policy over it.
#include "cuda/stream_graph.h"

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"

namespace moeforge::cuda {

StreamGraph::StreamGraph(cudaStream_t stream, const std::function<void()>& enqueue) {
  DeviceAllocator& allocator = DeviceAllocator::instance();
  MF_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  allocator.begin_hold(&held_);
  try {
    enqueue();
  } catch (...) {
    allocator.end_hold();
    cudaGraph_t partial = nullptr;
    cudaStreamEndCapture(stream, &partial);
    if (partial != nullptr) cudaGraphDestroy(partial);
    (void)cudaGetLastError();
    release();
    throw;
  }
  allocator.end_hold();
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph_);
  if (ended != cudaSuccess) {
    (void)cudaGetLastError();
    release();
    MF_FAIL(
        "CUDA graph capture failed: {} (the captured work synchronised, used another stream "
        "without an event, or called an API that cannot be captured)",
        cudaGetErrorString(ended));
  }
  MF_CUDA_CHECK(cudaGraphGetNodes(graph_, nullptr, &num_nodes_));
  const cudaError_t made = cudaGraphInstantiate(&exec_, graph_, 0);
  if (made != cudaSuccess) {
    (void)cudaGetLastError();
    release();
    MF_FAIL("CUDA graph instantiation failed: {}", cudaGetErrorString(made));
  }
}

StreamGraph::~StreamGraph() {
  release();
}

void StreamGraph::release() {
  // The last replay must be done with the held memory before anything else may take it.
  if (launched_on_ != nullptr) cudaStreamSynchronize(launched_on_);
  launched_on_ = nullptr;
  if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
  if (graph_ != nullptr) cudaGraphDestroy(graph_);
  exec_ = nullptr;
  graph_ = nullptr;
  DeviceAllocator& allocator = DeviceAllocator::instance();
  for (void* block : held_) allocator.deallocate(block);
  held_.clear();
}

void StreamGraph::launch(cudaStream_t stream) {
  MF_CUDA_CHECK(cudaGraphLaunch(exec_, stream));
  launched_on_ = stream;
}

bool ReplayedWork::run(cudaStream_t stream, const std::function<void()>& enqueue) {
  if (graph_ != nullptr) {
    graph_->launch(stream);
    return false;
  }
  if (!warmed_up_) {
    warmed_up_ = true;
    enqueue();
    return false;
  }
  graph_ = std::make_unique<StreamGraph>(stream, enqueue);
  graph_->launch(stream);
  return true;
}

}  // namespace moeforge::cuda
