// Token embedding lookup and its scatter-add backward on the CPU.
#include "ops/embedding.h"

#include <algorithm>

#include "core/error.h"

namespace moeforge::ops {

namespace {

// Token ids index rows of the table; the table size is not passed, so only the sign is checked.
void check_tokens(const char* what, const int32_t* tokens, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    MF_CHECK(tokens[i] >= 0, "{}: token id {} at row {} is negative", what, tokens[i], i);
  }
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int64_t n, int64_t c) {
  MF_CHECK(n >= 0 && c > 0, "embedding_forward: invalid dims n={} c={}", n, c);
  check_tokens("embedding_forward", tokens, n);
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    const T* src = table + static_cast<int64_t>(tokens[i]) * c;
    for (int64_t j = 0; j < c; ++j) out[i * c + j] = src[j];
  }
}

template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t c) {
  MF_CHECK(n >= 0 && c > 0, "embedding_backward: invalid dims n={} c={}", n, c);
  check_tokens("embedding_backward", tokens, n);
  // Threads split the columns into blocks; each block visits the rows in index order, so repeated
  // tokens accumulate in the same order whatever the thread count.
  constexpr int64_t kColumnBlock = 64;
  const int64_t num_blocks = (c + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for
  for (int64_t block_idx = 0; block_idx < num_blocks; ++block_idx) {
    const int64_t col_begin = block_idx * kColumnBlock;
    const int64_t col_end = std::min(col_begin + kColumnBlock, c);
    for (int64_t i = 0; i < n; ++i) {
      T* dst = dtable + static_cast<int64_t>(tokens[i]) * c;
      for (int64_t j = col_begin; j < col_end; ++j) dst[j] += dout[i * c + j];
    }
  }
}

template void embedding_forward<float>(float*, const int32_t*, const float*, int64_t, int64_t);
template void embedding_forward<double>(double*, const int32_t*, const double*, int64_t, int64_t);
template void embedding_backward<float>(float*, const float*, const int32_t*, int64_t, int64_t);
template void embedding_backward<double>(double*, const double*, const int32_t*, int64_t, int64_t);

}  // namespace moeforge::ops
