// Dense GEMMs of the CUDA backend through cuBLASLt: bf16 operands, fp32 accumulation, bf16 or fp32
// output, optional accumulation into the output (beta = 1). Row-major in the language of
// nn.Linear: weights are [out, in]. cuBLASLt's heuristic is asked for algorithms that fit the
// actual pointer alignments, so any sub-matrix pointer works (aligned ones run faster).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "cuda/bf16.h"
#include "cuda/device_memory.h"

namespace moeforge::cuda {

enum class OutType { kBf16, kFloat };

struct MatmulShape {
  int64_t m, n, k;  // C [m, n] = op(A) [m, k] * op(B) [k, n]
  bool trans_a;     // A stored [k, m] when true, else [m, k]
  bool trans_b;     // B stored [n, k] when true, else [k, n]
};

class Blas {
 public:
  Blas();
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  // C = op(A) op(B) (+ C when accumulate). Row-major, leading dimensions implied by the shape.
  // C is bf16* or float* as out says. With bf16 output and accumulate, cuBLASLt may round the
  // product to bf16 before adding C (one more rounding than fp32 output).
  void matmul(void* c, OutType out, const bf16* a, const bf16* b, const MatmulShape& shape,
              bool accumulate, cudaStream_t stream);

  // y [n, out] (fp32) = residual [n, out] (fp32) + x [n, in] W^T: the residual stream's add in
  // the GEMM's epilogue (C and D distinct), with no copy of the residual first. residual may be y.
  void linear_forward_add(float* y, const float* residual, const bf16* x, const bf16* w, int64_t n,
                          int64_t in, int64_t out_features, cudaStream_t stream);

  // nn.Linear helpers. y [n, out] = x [n, in] W^T (+ bias [out], fp32, added after the GEMM;
  // bf16 output only).
  void linear_forward(void* y, OutType out, const bf16* x, const bf16* w, const float* bias,
                      int64_t n, int64_t in, int64_t out_features, bool accumulate,
                      cudaStream_t stream);
  // dx [n, in] (=, or += when accumulate) = dy [n, out] W.
  void linear_backward_input(void* dx, OutType out, const bf16* dy, const bf16* w, int64_t n,
                             int64_t in, int64_t out_features, bool accumulate,
                             cudaStream_t stream);
  // dw [out, in] (fp32) = dy^T x, or += when accumulate (beta = 0 reads no dw).
  void linear_backward_weight(float* dw, const bf16* dy, const bf16* x, int64_t n, int64_t in,
                              int64_t out_features, bool accumulate, cudaStream_t stream);

 private:
  struct Plan;
  struct Layouts;
  // (m, n, k bucketed, trans_a, trans_b, out type, alignment of a, b and c in bytes, exact)
  using PlanKey = std::tuple<int64_t, int64_t, int64_t, bool, bool, int, int, int, int, bool>;
  // The algorithm for a shape: chosen once per bucket of sizes (expert GEMMs change their row
  // count every step, and a heuristic query costs far more than the GEMM launch), or for the exact
  // shape when the bucket's algorithm does not run it.
  Plan& plan(const MatmulShape& shape, OutType out, const Layouts& layouts, int align_a,
             int align_b, int align_c, bool exact);
  // D = op(A) op(B) + beta C (C read only when beta != 0; C may be D).
  void run_matmul(void* d, const void* c, float beta, OutType out, const bf16* a, const bf16* b,
                  const MatmulShape& shape, cudaStream_t stream);

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer<uint8_t> workspace_;
  std::map<PlanKey, std::unique_ptr<Plan>> plans_;
};

}  // namespace moeforge::cuda
