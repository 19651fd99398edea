// cuBLASLt GEMMs: row-major requests mapped onto cuBLASLt's column-major convention
// (C = op(A) op(B) row-major is C^T = op(B)^T op(A)^T column-major); the heuristic's algorithm is
// cached per bucket of sizes, type and pointer alignment, the layouts are built per call.
#include "cuda/blas.h"

#include <algorithm>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/reductions.h"

namespace moeforge::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

int alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  int align = 256;
  while (align > 1 && address % static_cast<uintptr_t>(align) != 0) align /= 2;
  return align;
}

// Sizes that share an algorithm: exact up to 64, then powers of two up to 1024, then multiples
// of 512.
int64_t size_bucket(int64_t x) {
  if (x <= 64) return x;
  if (x <= 1024) {
    int64_t b = 64;
    while (b < x) b *= 2;
    return b;
  }
  return (x + 511) / 512 * 512;
}

}  // namespace

struct Blas::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatmulAlgo_t algo{};

  ~Plan() {
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
};

// The operand layouts of one exact shape in cuBLASLt's column-major view: D^T [n, m] =
// op(B)^T [n, k] * op(A)^T [k, m], so Lt's A is our B and Lt's B is our A.
struct Blas::Layouts {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;

  Layouts(const MatmulShape& s, OutType out) {
    const uint64_t a_rows = s.trans_b ? s.k : s.n, a_cols = s.trans_b ? s.n : s.k;
    const uint64_t b_rows = s.trans_a ? s.m : s.k, b_cols = s.trans_a ? s.k : s.m;
    const cudaDataType_t c_type = out == OutType::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
    MF_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, a_rows, a_cols, static_cast<int64_t>(a_rows)));
    MF_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, b_rows, b_cols, static_cast<int64_t>(b_rows)));
    MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&c, c_type, static_cast<uint64_t>(s.n),
                                               static_cast<uint64_t>(s.m), s.n));
  }
  ~Layouts() {
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
  }
  Layouts(const Layouts&) = delete;
  Layouts& operator=(const Layouts&) = delete;
};

Blas::Blas() {
  MF_CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_.resize(kWorkspaceBytes);
}

Blas::~Blas() {
  plans_.clear();
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

Blas::Plan& Blas::plan(const MatmulShape& s, OutType out, const Layouts& layouts, int align_a,
                       int align_b, int align_c, bool exact) {
  const PlanKey key{exact ? s.m : size_bucket(s.m),
                    exact ? s.n : size_bucket(s.n),
                    exact ? s.k : size_bucket(s.k),
                    s.trans_a,
                    s.trans_b,
                    static_cast<int>(out),
                    align_a,
                    align_b,
                    align_c,
                    exact};
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;

  auto p = std::make_unique<Plan>();
  MF_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // Column-major view: D^T [n, m] = op(B)^T [n, k] * op(A)^T [k, m]; Lt's A is our B.
  const cublasOperation_t trans_lt_a = s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t trans_lt_b = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  MF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_lt_a,
                                                 sizeof(trans_lt_a)));
  MF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_lt_b,
                                                 sizeof(trans_lt_b)));

  cublasLtMatmulPreference_t pref = nullptr;
  MF_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t workspace_bytes = kWorkspaceBytes;
  const uint32_t lt_align_a = static_cast<uint32_t>(align_b), lt_align_b = align_a;
  const uint32_t lt_align_c = static_cast<uint32_t>(align_c);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                       &workspace_bytes, sizeof(workspace_bytes));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                       &lt_align_a, sizeof(lt_align_a));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                       &lt_align_b, sizeof(lt_align_b));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                       &lt_align_c, sizeof(lt_align_c));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                       &lt_align_c, sizeof(lt_align_c));
  // Split-K partial sums only in fp32: reducing them in the output type (bf16) rounds once per
  // split.
  const uint32_t reduction_mask = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                       &reduction_mask, sizeof(reduction_mask));
  cublasLtMatmulHeuristicResult_t result{};
  int num_results = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle_, p->desc, layouts.a, layouts.b, layouts.c, layouts.c, pref, 1, &result, &num_results);
  cublasLtMatmulPreferenceDestroy(pref);
  MF_CHECK(status == CUBLAS_STATUS_SUCCESS && num_results > 0,
           "cuBLASLt has no algorithm for a [{}, {}] x [{}, {}] bf16 GEMM (trans_a {}, trans_b {}, "
           "{} output, alignments {}/{}/{} bytes): {}",
           s.m, s.k, s.k, s.n, s.trans_a, s.trans_b, out == OutType::kBf16 ? "bf16" : "fp32",
           align_a, align_b, align_c, cublasGetStatusString(status));
  p->algo = result.algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

void Blas::matmul(void* c, OutType out, const bf16* a, const bf16* b, const MatmulShape& shape,
                  bool accumulate, cudaStream_t stream) {
  MF_CHECK(shape.m >= 0 && shape.n >= 0 && shape.k >= 0, "matmul: negative shape [{}, {}, {}]",
           shape.m, shape.n, shape.k);
  if (shape.m == 0 || shape.n == 0) return;
  const size_t out_bytes = out == OutType::kBf16 ? 2 : 4;
  if (shape.k == 0) {
    if (!accumulate) zero_device(c, static_cast<size_t>(shape.m * shape.n) * out_bytes, stream);
    return;
  }
  run_matmul(c, c, accumulate ? 1.0f : 0.0f, out, a, b, shape, stream);
}

void Blas::run_matmul(void* d, const void* c, float beta, OutType out, const bf16* a, const bf16* b,
                      const MatmulShape& shape, cudaStream_t stream) {
  const Layouts layouts(shape, out);
  const int align_a = alignment_of(a), align_b = alignment_of(b);
  const int align_c = std::min(alignment_of(c), alignment_of(d));
  const float alpha = 1.0f;
  auto run = [&](const Plan& p) {
    return cublasLtMatmul(handle_, p.desc, &alpha, b, layouts.a, a, layouts.b, &beta, c, layouts.c,
                          d, layouts.c, &p.algo, workspace_.data(), kWorkspaceBytes, stream);
  };
  if (run(plan(shape, out, layouts, align_a, align_b, align_c, false)) == CUBLAS_STATUS_SUCCESS) {
    return;
  }
  MF_CUBLAS_CHECK(run(plan(shape, out, layouts, align_a, align_b, align_c, true)));
}

void Blas::linear_forward_add(float* y, const float* residual, const bf16* x, const bf16* w,
                              int64_t n, int64_t in, int64_t out_features, cudaStream_t stream) {
  const MatmulShape shape{n, out_features, in, false, true};
  MF_CHECK(n >= 0 && in >= 0 && out_features >= 0, "linear_forward_add: negative shape");
  if (n == 0 || out_features == 0) return;
  if (in == 0) {
    if (y != residual) {
      MF_CUDA_CHECK(cudaMemcpyAsync(y, residual,
                                    static_cast<size_t>(n * out_features) * sizeof(float),
                                    cudaMemcpyDeviceToDevice, stream));
    }
    return;
  }
  run_matmul(y, residual, 1.0f, OutType::kFloat, x, w, shape, stream);
}

void Blas::linear_forward(void* y, OutType out, const bf16* x, const bf16* w, const float* bias,
                          int64_t n, int64_t in, int64_t out_features, bool accumulate,
                          cudaStream_t stream) {
  MF_CHECK(bias == nullptr || out == OutType::kBf16, "linear_forward: a bias needs bf16 output");
  matmul(y, out, x, w, MatmulShape{n, out_features, in, false, true}, accumulate, stream);
  if (bias != nullptr) add_bias(static_cast<bf16*>(y), bias, n, out_features, stream);
}

void Blas::linear_backward_input(void* dx, OutType out, const bf16* dy, const bf16* w, int64_t n,
                                 int64_t in, int64_t out_features, bool accumulate,
                                 cudaStream_t stream) {
  matmul(dx, out, dy, w, MatmulShape{n, in, out_features, false, false}, accumulate, stream);
}

void Blas::linear_backward_weight(float* dw, const bf16* dy, const bf16* x, int64_t n, int64_t in,
                                  int64_t out_features, bool accumulate, cudaStream_t stream) {
  matmul(dw, OutType::kFloat, dy, x, MatmulShape{out_features, in, n, true, false}, accumulate,
         stream);
}

}  // namespace moeforge::cuda
