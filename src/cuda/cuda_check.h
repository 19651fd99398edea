// CHECK macros for the CUDA runtime: report the expression, the library's message and file:line
// (and cuBLAS) as a moeforge::Error. MF_CUDA_CHECK_LAUNCH() goes after every kernel launch.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/error.h"

#define MF_CUDA_CHECK(expr)                                                                     \
  do {                                                                                          \
    const cudaError_t mf_cuda_status = (expr);                                                  \
    if (mf_cuda_status != cudaSuccess) {                                                        \
      ::moeforge::throw_error(                                                                  \
          __FILE__, __LINE__,                                                                   \
          ::fmt::format("CUDA error in {}: {} ({})", #expr, cudaGetErrorString(mf_cuda_status), \
                        cudaGetErrorName(mf_cuda_status)));                                     \
    }                                                                                           \
  } while (0)

#define MF_CUDA_CHECK_LAUNCH() MF_CUDA_CHECK(cudaGetLastError())

#define MF_CUBLAS_CHECK(expr)                                                        \
  do {                                                                               \
    const cublasStatus_t mf_cublas_status = (expr);                                  \
    if (mf_cublas_status != CUBLAS_STATUS_SUCCESS) {                                 \
      ::moeforge::throw_error(__FILE__, __LINE__,                                    \
                              ::fmt::format("cuBLAS error in {}: {} ({})", #expr,    \
                                            cublasGetStatusString(mf_cublas_status), \
                                            cublasGetStatusName(mf_cublas_status))); \
    }                                                                                \
  } while (0)
