// The gradient sums of train/grad_reduce.h on device buffers, through a communicator of device
// buffers (NcclCommunicator) whose collectives run on the caller's stream: the data-parallel
// reduction of the CUDA step engine, without the round trip through host memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "comm/communicator.h"
#include "cuda/bf16.h"
#include "cuda/device_memory.h"
#include "train/grad_reduce.h"

namespace moeforge::cuda {

// data[i] = sum over the ranks of comm of data[i], in place, on every rank, as
// all_reduce_gradients() does on the host. kFloat32: comm's all-reduce (NCCL picks the order of
// the additions). kBfloat16 (MegaScale-MoE section 3): each rank rounds its gradient once to bf16
// and exchanges it with an all-to-all; rank r sums every rank's copy of chunk r in fp32 in rank
// order and the fp32 chunks are all-gathered, so the result has exactly the host version's bits.
// comm's collectives must run on `stream` (NcclCommunicator::set_stream), which also orders the
// casts and sums; the scratch buffers are kept for the next call and only ever grow.
class DeviceGradReducer {
 public:
  void all_reduce(float* data, size_t count, Communicator& comm, GradReduceDtype dtype,
                  cudaStream_t stream);
  // out[i] (i < chunk) = the sum over the ranks of comm of data[rank * chunk + i], data holding
  // comm.size() x chunk elements (ZeRO-1's gradient shards): kFloat32 comm's reduce-scatter;
  // kBfloat16 all_reduce's bf16 all-to-all and rank-order fp32 sum without the all-gather (one
  // rank too: its gradient rounded to bf16), the host reduce_scatter_gradients_bf16's bits.
  void reduce_scatter(const float* data, size_t chunk, float* out, Communicator& comm,
                      GradReduceDtype dtype, cudaStream_t stream);
  // Allocates now the scratch that calls of up to max_count elements over num_ranks need, so that
  // they allocate nothing (no block freed to the caching allocator while another stream runs).
  void reserve(size_t max_count, int num_ranks, GradReduceDtype dtype);

 private:
  DeviceBuffer<bf16> send_, recv_;
  DeviceBuffer<float> shard_, gathered_;
};

// out[i] = sum over r = 0, 1, ..., num_ranks - 1 (in that order, from 0.0f) of float(in[r * chunk
// + i]), for i < chunk.
void sum_rank_chunks(float* out, const bf16* in, int num_ranks, int64_t chunk, cudaStream_t stream);

}  // namespace moeforge::cuda
