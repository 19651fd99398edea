// Device gradient sums over data-parallel ranks (fp32, or bf16-compressed with an fp32 local sum).
#include "cuda/grad_reduce_device.h"

#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/reductions.h"

namespace moeforge::cuda {
namespace {

__global__ void sum_rank_chunks_kernel(float* out, const bf16* in, int num_ranks, int64_t chunk) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < chunk;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int r = 0; r < num_ranks; ++r) sum = __fadd_rn(sum, __bfloat162float(in[r * chunk + i]));
    out[i] = sum;
  }
}

template <typename T>
void grow(DeviceBuffer<T>& buffer, size_t count) {
  if (buffer.size() < count) buffer.resize(count);
}

}  // namespace

void sum_rank_chunks(float* out, const bf16* in, int num_ranks, int64_t chunk,
                     cudaStream_t stream) {
  if (chunk == 0) return;
  constexpr int kThreads = 256;
  sum_rank_chunks_kernel<<<grid_for(chunk, kThreads), kThreads, 0, stream>>>(out, in, num_ranks,
                                                                             chunk);
  MF_CUDA_CHECK(cudaGetLastError());
}

void DeviceGradReducer::reserve(size_t max_count, int num_ranks, GradReduceDtype dtype) {
  if (num_ranks <= 1 || max_count == 0 || dtype == GradReduceDtype::kFloat32) return;
  const auto n = static_cast<size_t>(num_ranks);
  const size_t chunk = (max_count + n - 1) / n;
  grow(send_, chunk * n);
  grow(recv_, chunk * n);
  grow(shard_, chunk);
  grow(gathered_, chunk * n);
}

void DeviceGradReducer::all_reduce(float* data, size_t count, Communicator& comm,
                                   GradReduceDtype dtype, cudaStream_t stream) {
  const auto num_ranks = static_cast<size_t>(comm.size());
  if (num_ranks == 1 || count == 0) return;
  if (dtype == GradReduceDtype::kFloat32) {
    comm.all_reduce_sum(data, count);
    return;
  }
  reserve(count, static_cast<int>(num_ranks), dtype);
  const size_t chunk = (count + num_ranks - 1) / num_ranks;
  cast_to_bf16(send_.data(), data, static_cast<int64_t>(count), stream);
  if (chunk * num_ranks > count) {
    MF_CUDA_CHECK(cudaMemsetAsync(send_.data() + count, 0,
                                  (chunk * num_ranks - count) * sizeof(bf16), stream));
  }
  comm.all_to_all(static_cast<const void*>(send_.data()), static_cast<void*>(recv_.data()), chunk,
                  CommDType::kBFloat16);
  sum_rank_chunks(shard_.data(), recv_.data(), static_cast<int>(num_ranks),
                  static_cast<int64_t>(chunk), stream);
  comm.all_gather(shard_.data(), gathered_.data(), chunk);
  MF_CUDA_CHECK(cudaMemcpyAsync(data, gathered_.data(), count * sizeof(float),
                                cudaMemcpyDeviceToDevice, stream));
}

void DeviceGradReducer::reduce_scatter(const float* data, size_t chunk, float* out,
                                       Communicator& comm, GradReduceDtype dtype,
                                       cudaStream_t stream) {
  const auto num_ranks = static_cast<size_t>(comm.size());
  if (chunk == 0) return;
  if (dtype == GradReduceDtype::kFloat32) {
    if (num_ranks == 1) {
      MF_CUDA_CHECK(
          cudaMemcpyAsync(out, data, chunk * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    } else {
      comm.reduce_scatter_sum(data, out, chunk, CommDType::kFloat32);
    }
    return;
  }
  grow(send_, chunk * num_ranks);
  cast_to_bf16(send_.data(), data, static_cast<int64_t>(chunk * num_ranks), stream);
  const bf16* copies = send_.data();
  if (num_ranks > 1) {
    grow(recv_, chunk * num_ranks);
    comm.all_to_all(static_cast<const void*>(send_.data()), static_cast<void*>(recv_.data()), chunk,
                    CommDType::kBFloat16);
    copies = recv_.data();
  }
  sum_rank_chunks(out, copies, static_cast<int>(num_ranks), static_cast<int64_t>(chunk), stream);
}

}  // namespace moeforge::cuda
