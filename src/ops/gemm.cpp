// CBLAS-backed GEMM for float and double. OpenBLAS is pinned to one thread and large products are
// split into row blocks of C across OpenMP threads instead: two thread pools (OpenBLAS's and
// OpenMP's) spinning against each other made training several times slower on small machines.
// Each row block is computed by one call, so results do not depend on the number of threads.
#include "ops/gemm.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <mutex>

namespace moeforge::ops {

namespace {

constexpr double kParallelFlops = 1 << 20;  // below this a product runs on one thread
constexpr int64_t kMinRowsPerBlock = 16;

void pin_blas_to_one_thread() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
               int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

}  // namespace

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  pin_blas_to_one_thread();
  const int max_threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int64_t num_blocks =
      flops < kParallelFlops
          ? 1
          : std::min<int64_t>(max_threads, std::max<int64_t>(1, m / kMinRowsPerBlock));
  if (num_blocks <= 1) {
    blas_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int64_t rows_per_block = (m + num_blocks - 1) / num_blocks;
#pragma omp parallel for schedule(static) num_threads(static_cast <int>(num_blocks))
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t row0 = blk * rows_per_block;
    const int64_t rows = std::min(rows_per_block, m - row0);
    if (rows <= 0) continue;
    // Rows of op(A): row i of A, or column i of A when transposed.
    const T* a_block = ta ? a + row0 : a + row0 * lda;
    blas_gemm(ta, tb, rows, n, k, alpha, a_block, lda, b, ldb, beta, c + row0 * ldc, ldc);
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

}  // namespace moeforge::ops
