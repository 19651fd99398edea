// Column slices and the rank / sequence reorders of tensor parallelism on the GPU (see
// tensor_parallel.h): strided copies through copy_rows_async, and one elementwise add kernel.
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"
#include "cuda/tensor_parallel.h"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 256;

void check_slice(const ColumnSlice& s) {
  MF_CHECK(s.rows >= 0 && s.width >= 0 && s.begin >= 0 && s.begin + s.width <= s.cols,
           "column slice [{}, {}) of a [{}, {}] matrix is out of range", s.begin, s.begin + s.width,
           s.rows, s.cols);
}

// matrix[i, begin + j] += packed[i, j] for i < rows, j < width (matrix rows cols apart).
__global__ void add_packed_columns_kernel(float* matrix, const float* packed, int64_t rows,
                                          int64_t cols, int64_t begin, int64_t width) {
  const int64_t count = rows * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / width;
    matrix[row * cols + begin + i % width] += packed[i];
  }
}

}  // namespace

void pack_columns(bf16* packed, const bf16* matrix, const ColumnSlice& slice, cudaStream_t stream) {
  check_slice(slice);
  copy_rows_async(packed, slice.width, matrix + slice.begin, slice.cols, slice.rows, slice.width,
                  stream);
}

void add_packed_columns(float* matrix, const float* packed, const ColumnSlice& slice,
                        cudaStream_t stream) {
  check_slice(slice);
  const int64_t count = slice.rows * slice.width;
  if (count == 0) return;
  add_packed_columns_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(
      matrix, packed, slice.rows, slice.cols, slice.begin, slice.width);
  MF_CUDA_CHECK_LAUNCH();
}

void rank_order_to_sequences(void* sequences, const void* ranks, int64_t batch, int64_t seq,
                             int64_t width, int64_t num_ranks, size_t elem_bytes,
                             cudaStream_t stream) {
  // Rank r's [batch, seq, width]: batch runs of seq * width elements, n runs apart in sequences.
  const size_t run = static_cast<size_t>(seq * width) * elem_bytes;
  for (int64_t r = 0; r < num_ranks; ++r) {
    void* dst = static_cast<char*>(sequences) + static_cast<size_t>(r) * run;
    const void* src = static_cast<const char*>(ranks) + static_cast<size_t>(r * batch) * run;
    copy_rows_async(dst, static_cast<size_t>(num_ranks) * run, src, run, run,
                    static_cast<size_t>(batch), stream);
  }
}

void sequences_to_rank_order(void* ranks, const void* sequences, int64_t batch, int64_t seq,
                             int64_t width, int64_t num_ranks, size_t elem_bytes,
                             cudaStream_t stream) {
  const size_t run = static_cast<size_t>(seq * width) * elem_bytes;
  for (int64_t r = 0; r < num_ranks; ++r) {
    void* dst = static_cast<char*>(ranks) + static_cast<size_t>(r * batch) * run;
    const void* src = static_cast<const char*>(sequences) + static_cast<size_t>(r) * run;
    copy_rows_async(dst, run, src, static_cast<size_t>(num_ranks) * run, run,
                    static_cast<size_t>(batch), stream);
  }
}

}  // namespace moeforge::cuda
