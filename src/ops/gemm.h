// Row-major GEMM on the CPU through CBLAS (OpenBLAS): C = alpha * op(A) @ op(B) + beta * C.
#pragma once

#include <cstdint>

namespace moeforge::ops {

// op(A) is [m, k], op(B) is [k, n], C is [m, n]; lda/ldb/ldc are row strides of A, B, C as stored.
template <typename T>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace moeforge::ops
