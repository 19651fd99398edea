// Tensor parallelism's local pieces on the GPU against the CPU spec (model/tensor_parallel.h):
// pack_columns and add_packed_columns bit for bit (a copy, one fp32 add per element), on slices
// at the start, middle and end of a matrix and of odd widths; and the reorders between a
// collective's rank order and the sequence order exactly as all_gather_sequences and
// reduce_scatter_sequences lay them out, in bf16 and fp32, one sequence and several.
#include "cuda/tensor_parallel.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "gpu_test_util.h"
#include "model/tensor_parallel.h"

namespace moeforge::cuda {
namespace {

using testing::expect_equal;
using testing::to_device;

// Slices of a [rows, cols] matrix: the first, a middle and the last of `parts`, and one of odd
// width.
std::vector<ColumnSlice> slices_of(int64_t rows, int64_t cols, int64_t parts) {
  const int64_t width = cols / parts;
  return {{rows, cols, 0, width},
          {rows, cols, (parts / 2) * width, width},
          {rows, cols, cols - width, width},
          {rows, cols, 3, 5}};
}

TEST(TensorParallelCuda, PackColumnsEqualsTheCpuSlice) {
  MF_REQUIRE_GPU();
  const int64_t rows = 37, cols = 96;
  const std::vector<bf16> matrix = to_bf16(testing::random_normal(rows * cols, 1));
  const std::vector<float> matrix_f32 = to_float(matrix);
  const DeviceBuffer<bf16> matrix_dev = to_device(matrix);
  for (const ColumnSlice& slice : slices_of(rows, cols, 4)) {
    SCOPED_TRACE("columns from " + std::to_string(slice.begin));
    std::vector<float> want(static_cast<size_t>(rows * slice.width));
    moeforge::pack_columns(want.data(), matrix_f32.data(), slice);
    DeviceBuffer<bf16> packed(want.size());
    testing::fill_garbage(packed);
    pack_columns(packed.data(), matrix_dev.data(), slice, nullptr);
    testing::synchronize();
    expect_equal("pack_columns", to_float(packed.download()), want);
  }
}

TEST(TensorParallelCuda, AddPackedColumnsEqualsTheCpuAdd) {
  MF_REQUIRE_GPU();
  const int64_t rows = 37, cols = 96;
  const std::vector<float> matrix = testing::random_normal(rows * cols, 2);
  for (const ColumnSlice& slice : slices_of(rows, cols, 3)) {
    SCOPED_TRACE("columns from " + std::to_string(slice.begin));
    const std::vector<float> packed = testing::random_normal(rows * slice.width, 3);
    std::vector<float> want = matrix;
    moeforge::add_packed_columns(want.data(), packed.data(), slice);
    DeviceBuffer<float> matrix_dev = to_device(matrix);
    const DeviceBuffer<float> packed_dev = to_device(packed);
    add_packed_columns(matrix_dev.data(), packed_dev.data(), slice, nullptr);
    testing::synchronize();
    expect_equal("add_packed_columns", matrix_dev.download(), want);
  }
}

TEST(TensorParallelCuda, SlicesOutsideTheMatrixAreRefused) {
  MF_REQUIRE_GPU();
  DeviceBuffer<bf16> packed(64);
  DeviceBuffer<float> grads(64);
  const ColumnSlice outside{4, 8, 6, 4};
  EXPECT_THROW(pack_columns(packed.data(), packed.data(), outside, nullptr), Error);
  EXPECT_THROW(add_packed_columns(grads.data(), grads.data(), outside, nullptr), Error);
}

// The sequence order of rank-ordered values: [batch, ranks * seq, width] from [ranks, batch, seq,
// width] (all_gather_sequences' copies).
template <typename T>
std::vector<T> to_sequences(const std::vector<T>& ranks, int64_t batch, int64_t seq, int64_t width,
                            int64_t num_ranks) {
  std::vector<T> out(ranks.size());
  const int64_t run = seq * width;
  for (int64_t r = 0; r < num_ranks; ++r) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < run; ++i) {
        out[(b * num_ranks + r) * run + i] = ranks[(r * batch + b) * run + i];
      }
    }
  }
  return out;
}

template <typename T>
void expect_reorders(const std::vector<T>& ranks, int64_t batch, int64_t seq, int64_t width,
                     int64_t num_ranks) {
  const DeviceBuffer<T> ranks_dev = to_device(ranks);
  DeviceBuffer<T> sequences(ranks.size()), back(ranks.size());
  testing::fill_garbage(sequences);
  testing::fill_garbage(back);
  rank_order_to_sequences(sequences.data(), ranks_dev.data(), batch, seq, width, num_ranks,
                          sizeof(T), nullptr);
  sequences_to_rank_order(back.data(), sequences.data(), batch, seq, width, num_ranks, sizeof(T),
                          nullptr);
  testing::synchronize();
  expect_equal("rank_order_to_sequences", sequences.download(),
               to_sequences(ranks, batch, seq, width, num_ranks));
  expect_equal("sequences_to_rank_order", back.download(), ranks);
}

TEST(TensorParallelCuda, ReordersBetweenRankAndSequenceOrder) {
  MF_REQUIRE_GPU();
  for (const int64_t batch : {1, 3}) {
    for (const int64_t num_ranks : {1, 2, 4}) {
      SCOPED_TRACE("batch " + std::to_string(batch) + ", " + std::to_string(num_ranks) + " ranks");
      const int64_t seq = 5, width = 7;
      const std::vector<float> x = testing::random_normal(num_ranks * batch * seq * width, 4);
      expect_reorders(x, batch, seq, width, num_ranks);
      expect_reorders(to_bf16(x), batch, seq, width, num_ranks);
    }
  }
}

}  // namespace
}  // namespace moeforge::cuda
