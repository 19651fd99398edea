// The device-buffer communicator that data-parallel gradient sums use on GPUs (the trainer's CUDA
// engine and `bench train` under mpirun): NCCL's, over the ranks of a host communicator, with its
// collectives on the caller's stream.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace moeforge::cuda {

// Collective over `host` (every rank calls it): an NcclCommunicator over its ranks on each rank's
// current device, its collectives enqueued on `stream`. Null, with *why_not saying why, when this
// build has no NCCL or some rank of `host` has no GPU of its own (NCCL needs one GPU per rank:
// local rank < GPUs of the host).
std::unique_ptr<Communicator> make_device_communicator(Communicator& host, cudaStream_t stream,
                                                       std::string* why_not);

}  // namespace moeforge::cuda
