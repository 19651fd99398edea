// Data-parallel gradient sums overlapped with the backward (as DDP and Megatron do): the backward
// reports each range of the flat gradient buffer as its last writing kernel is enqueued, the
// ranges fill buckets (train/grad_buckets.h), and each full bucket is summed on a stream of its
// own while the backward goes on with the layers before it. Same sums as DeviceGradReducer over
// the whole buffer (bf16: the same bits; fp32: NCCL's all-reduce per piece). For ZeRO-1 the fp32
// sums can go to the owners only (Communicator::reduce_sum per piece of each owner's shard): half
// the traffic of an all-reduce, overlapped with the backward like it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <optional>
#include <vector>

#include "comm/communicator.h"
#include "cuda/grad_reduce_device.h"
#include "train/grad_buckets.h"
#include "train/grad_reduce.h"

namespace moeforge::cuda {

class BucketedGradReducer {
 public:
  BucketedGradReducer();
  ~BucketedGradReducer();
  BucketedGradReducer(const BucketedGradReducer&) = delete;
  BucketedGradReducer& operator=(const BucketedGradReducer&) = delete;

  // The stream every sum runs on: the device communicator passed to begin() must enqueue its
  // collectives there (make_device_communicator(host, stream(), ...)).
  cudaStream_t stream() const { return stream_; }

  // Starts one reduction of grads over comm, with GradBuckets(ranges, bucket_elems). The scratch
  // of the largest piece is allocated here, before any sum runs beside the backward: a block
  // freed and reused meanwhile by the other stream would race. owner_chunk > 0 (fp32 only): each
  // element is summed onto its owner only, rank r owning [r * owner_chunk, (r + 1) *
  // owner_chunk) (ZeRO-1's shards); the other ranks' copies are left unsummed.
  void begin(float* grads, std::vector<GradRange> ranges, size_t bucket_elems, Communicator& comm,
             GradReduceDtype dtype, int64_t owner_chunk = 0);
  bool active() const { return buckets_.has_value(); }
  // Range `index` (the next one) is final once the work enqueued so far on `compute` has run.
  void ready(size_t index, cudaStream_t compute);
  // Sums whatever the ready() calls left (everything when there were none) and makes `compute`
  // wait for every sum: work enqueued on it afterwards sees the summed gradient.
  void finish(cudaStream_t compute);
  // Not overlapped: the sums over comm of the given ranges of grads, in one go once the work
  // enqueued so far on `compute` has run; `compute` then waits for them.
  void sum_ranges(float* grads, const std::vector<GradRange>& ranges, Communicator& comm,
                  GradReduceDtype dtype, cudaStream_t compute);

 private:
  void sum(GradRange span, cudaStream_t compute);

  cudaStream_t stream_ = nullptr;
  cudaEvent_t event_ = nullptr;
  DeviceGradReducer reducer_;
  std::optional<GradBuckets> buckets_;
  float* grads_ = nullptr;
  Communicator* comm_ = nullptr;
  GradReduceDtype dtype_ = GradReduceDtype::kFloat32;
  int64_t owner_chunk_ = 0;
};

}  // namespace moeforge::cuda
