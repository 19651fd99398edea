// Scatter into and gather from the expert-sorted rows of a RowMap. Every output row is written by
// exactly one loop iteration, and sums over a token's slots run in slot order, so the results do
// not depend on the number of threads.
#include "ops/permute.h"

#include "core/error.h"

namespace moeforge::ops {

namespace {

void check_map(const RowMap& map) {
  MF_CHECK(static_cast<int64_t>(map.assignment_row.size()) == map.num_tokens * map.top_k,
           "row map: assignment_row has {} entries, expected num_tokens {} x top_k {}",
           map.assignment_row.size(), map.num_tokens, map.top_k);
}

}  // namespace

template <typename T>
void scatter_rows_forward(T* rows, const T* x, const RowMap& map, int64_t c) {
  const int64_t num_rows = map.num_rows();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < num_rows; ++r) {
    const T* src = x + static_cast<int64_t>(map.row_token[r]) * c;
    T* dst = rows + r * c;
    for (int64_t i = 0; i < c; ++i) dst[i] = src[i];
  }
}

template <typename T>
void scatter_rows_backward(T* dx, const T* drows, const RowMap& map, int64_t c) {
  check_map(map);
  const int64_t top_k = map.top_k;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < map.num_tokens; ++t) {
    T* dst = dx + t * c;
    for (int64_t i = 0; i < c; ++i) dst[i] = T(0);
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t r = map.assignment_row[t * top_k + j];
      if (r < 0) continue;
      const T* src = drows + r * c;
      for (int64_t i = 0; i < c; ++i) dst[i] += src[i];
    }
  }
}

template <typename T>
void gather_rows_forward(T* out, const T* rows, const T* gates, const RowMap& map, int64_t c) {
  check_map(map);
  const int64_t top_k = map.top_k;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < map.num_tokens; ++t) {
    T* dst = out + t * c;
    for (int64_t i = 0; i < c; ++i) dst[i] = T(0);
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t r = map.assignment_row[t * top_k + j];
      if (r < 0) continue;
      const T gate = gates[t * top_k + j];
      const T* src = rows + r * c;
      for (int64_t i = 0; i < c; ++i) dst[i] += gate * src[i];
    }
  }
}

template <typename T>
void gather_rows_backward(T* drows, T* dgates, const T* dout, const T* rows, const T* gates,
                          const RowMap& map, int64_t c) {
  check_map(map);
  const int64_t top_k = map.top_k;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < map.num_tokens; ++t) {
    const T* dy = dout + t * c;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t a = t * top_k + j;
      const int64_t r = map.assignment_row[a];
      if (r < 0) {
        dgates[a] = T(0);
        continue;
      }
      const T gate = gates[a];
      const T* y = rows + r * c;
      T* dy_row = drows + r * c;
      T dot = T(0);
      for (int64_t i = 0; i < c; ++i) {
        dy_row[i] = gate * dy[i];
        dot += dy[i] * y[i];
      }
      dgates[a] = dot;
    }
  }
}

#define MOEFORGE_INSTANTIATE_PERMUTE(T)                                                      \
  template void scatter_rows_forward<T>(T*, const T*, const RowMap&, int64_t);               \
  template void scatter_rows_backward<T>(T*, const T*, const RowMap&, int64_t);              \
  template void gather_rows_forward<T>(T*, const T*, const T*, const RowMap&, int64_t);      \
  template void gather_rows_backward<T>(T*, T*, const T*, const T*, const T*, const RowMap&, \
                                        int64_t);
MOEFORGE_INSTANTIATE_PERMUTE(float)
MOEFORGE_INSTANTIATE_PERMUTE(double)
#undef MOEFORGE_INSTANTIATE_PERMUTE

}  // namespace moeforge::ops
