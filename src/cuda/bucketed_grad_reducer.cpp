// Bucketed gradient sums on a stream of their own, overlapped with the backward.
#include "cuda/bucketed_grad_reducer.h"

#include <algorithm>
#include <utility>

#include "core/error.h"
#include "cuda/cuda_check.h"

namespace moeforge::cuda {

BucketedGradReducer::BucketedGradReducer() {
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MF_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
}

BucketedGradReducer::~BucketedGradReducer() {
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  if (event_ != nullptr) cudaEventDestroy(event_);
}

void BucketedGradReducer::begin(float* grads, std::vector<GradRange> ranges, size_t bucket_elems,
                                Communicator& comm, GradReduceDtype dtype, int64_t owner_chunk) {
  MF_CHECK(!active(), "a gradient reduction is already running (finish() was not called)");
  MF_CHECK(owner_chunk >= 0, "negative owner chunk {}", owner_chunk);
  MF_CHECK(owner_chunk == 0 || dtype == GradReduceDtype::kFloat32,
           "gradient sums onto their owners only are fp32 (the bf16 reduction is ZeRO-1's "
           "reduce-scatter after the backward)");
  GradBuckets buckets(std::move(ranges), bucket_elems);
  reducer_.reserve(buckets.max_piece(), comm.size(), dtype);
  buckets_.emplace(std::move(buckets));
  grads_ = grads;
  comm_ = &comm;
  dtype_ = dtype;
  owner_chunk_ = owner_chunk;
}

void BucketedGradReducer::ready(size_t index, cudaStream_t compute) {
  MF_CHECK(active(), "gradient range {} reported with no reduction running", index);
  sum(buckets_->ready(index), compute);
}

void BucketedGradReducer::finish(cudaStream_t compute) {
  MF_CHECK(active(), "no gradient reduction to finish");
  sum(buckets_->rest(), compute);
  MF_CUDA_CHECK(cudaEventRecord(event_, stream_));
  MF_CUDA_CHECK(cudaStreamWaitEvent(compute, event_, 0));
  buckets_.reset();
  grads_ = nullptr;
  comm_ = nullptr;
}

void BucketedGradReducer::sum_ranges(float* grads, const std::vector<GradRange>& ranges,
                                     Communicator& comm, GradReduceDtype dtype,
                                     cudaStream_t compute) {
  MF_CHECK(!active(), "sum_ranges while a bucketed reduction is in flight");
  int64_t largest = 0;
  for (const GradRange& r : ranges) largest = std::max(largest, r.count);
  reducer_.reserve(static_cast<size_t>(largest), comm.size(), dtype);
  MF_CUDA_CHECK(cudaEventRecord(event_, compute));
  MF_CUDA_CHECK(cudaStreamWaitEvent(stream_, event_, 0));
  for (const GradRange& r : ranges) {
    reducer_.all_reduce(grads + r.offset, static_cast<size_t>(r.count), comm, dtype, stream_);
  }
  MF_CUDA_CHECK(cudaEventRecord(event_, stream_));
  MF_CUDA_CHECK(cudaStreamWaitEvent(compute, event_, 0));
}

void BucketedGradReducer::sum(GradRange span, cudaStream_t compute) {
  // One rank: the owner sums are no-ops (and so is DeviceGradReducer's all-reduce).
  if (span.count == 0 || (owner_chunk_ > 0 && comm_->size() == 1)) return;
  // The sums start once the backward's kernels enqueued so far (those writing the span) ran.
  MF_CUDA_CHECK(cudaEventRecord(event_, compute));
  MF_CUDA_CHECK(cudaStreamWaitEvent(stream_, event_, 0));
  for (const GradRange& piece : buckets_->pieces(span)) {
    if (owner_chunk_ == 0) {
      reducer_.all_reduce(grads_ + piece.offset, static_cast<size_t>(piece.count), *comm_, dtype_,
                          stream_);
      continue;
    }
    for (int64_t begin = piece.offset; begin < piece.offset + piece.count;) {
      const int64_t owner = begin / owner_chunk_;
      const int64_t end = std::min(piece.offset + piece.count, (owner + 1) * owner_chunk_);
      comm_->reduce_sum(grads_ + begin, static_cast<size_t>(end - begin), CommDType::kFloat32,
                        static_cast<int>(owner));
      begin = end;
    }
  }
}

}  // namespace moeforge::cuda
