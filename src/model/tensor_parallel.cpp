// The parallel layouts' names, the sequence-ordered all-gather / reduce-scatter and the column
// slices of tensor parallelism (see tensor_parallel.h).
#include "model/tensor_parallel.h"

#include <algorithm>

#include "core/error.h"

namespace moeforge {

ParallelLayout parse_parallel_layout(const std::string& name) {
  if (name == "sp_ep") return ParallelLayout::kSequenceExpert;
  if (name == "tp") return ParallelLayout::kTensor;
  MF_FAIL("unknown parallel layout \"{}\": use \"sp_ep\" or \"tp\"", name);
}

std::string parallel_layout_name(ParallelLayout layout) {
  switch (layout) {
    case ParallelLayout::kSequenceExpert: return "sp_ep";
    case ParallelLayout::kTensor: return "tp";
  }
  MF_FAIL("unknown ParallelLayout {}", static_cast<int>(layout));
}

template <typename T>
void all_gather_sequences(T* full, const T* local, int64_t batch, int64_t seq, int64_t width,
                          Communicator& group, std::vector<T>& scratch) {
  const int64_t num_ranks = group.size();
  const int64_t run = seq * width;  // one rank's positions of one sequence
  scratch.resize(static_cast<size_t>(num_ranks * batch * run));
  // The all-gather stacks the ranks' shards: [n, batch, seq, width].
  group.all_gather(local, scratch.data(), static_cast<size_t>(batch * run));
  for (int64_t r = 0; r < num_ranks; ++r) {
    for (int64_t b = 0; b < batch; ++b) {
      const T* src = scratch.data() + (r * batch + b) * run;
      std::copy(src, src + run, full + (b * num_ranks + r) * run);
    }
  }
}

template <typename T>
void reduce_scatter_sequences(T* local, const T* full, int64_t batch, int64_t seq, int64_t width,
                              Communicator& group, std::vector<T>& scratch) {
  const int64_t num_ranks = group.size();
  const int64_t run = seq * width;
  scratch.resize(static_cast<size_t>(num_ranks * batch * run));
  // Chunk r of the reduce-scatter is rank r's positions: [n, batch, seq, width].
  for (int64_t r = 0; r < num_ranks; ++r) {
    for (int64_t b = 0; b < batch; ++b) {
      const T* src = full + (b * num_ranks + r) * run;
      std::copy(src, src + run, scratch.data() + (r * batch + b) * run);
    }
  }
  group.reduce_scatter_sum(scratch.data(), local, static_cast<size_t>(batch * run));
}

namespace {

void check_slice(const ColumnSlice& s) {
  MF_CHECK(s.rows >= 0 && s.width >= 0 && s.begin >= 0 && s.begin + s.width <= s.cols,
           "column slice [{}, {}) of a [{}, {}] matrix is out of range", s.begin, s.begin + s.width,
           s.rows, s.cols);
}

}  // namespace

template <typename T>
void pack_columns(T* packed, const T* matrix, const ColumnSlice& s) {
  check_slice(s);
  for (int64_t i = 0; i < s.rows; ++i) {
    const T* src = matrix + i * s.cols + s.begin;
    std::copy(src, src + s.width, packed + i * s.width);
  }
}

template <typename T>
void add_packed_columns(T* matrix, const T* packed, const ColumnSlice& s) {
  check_slice(s);
  for (int64_t i = 0; i < s.rows; ++i) {
    T* dst = matrix + i * s.cols + s.begin;
    const T* src = packed + i * s.width;
    for (int64_t j = 0; j < s.width; ++j) dst[j] += src[j];
  }
}

#define MOEFORGE_INSTANTIATE_TENSOR_PARALLEL(T)                                                 \
  template void all_gather_sequences<T>(T*, const T*, int64_t, int64_t, int64_t, Communicator&, \
                                        std::vector<T>&);                                       \
  template void reduce_scatter_sequences<T>(T*, const T*, int64_t, int64_t, int64_t,            \
                                            Communicator&, std::vector<T>&);                    \
  template void pack_columns<T>(T*, const T*, const ColumnSlice&);                              \
  template void add_packed_columns<T>(T*, const T*, const ColumnSlice&);
MOEFORGE_INSTANTIATE_TENSOR_PARALLEL(float)
MOEFORGE_INSTANTIATE_TENSOR_PARALLEL(double)
#undef MOEFORGE_INSTANTIATE_TENSOR_PARALLEL

}  // namespace moeforge
