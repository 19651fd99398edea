// The experts' GEMM candidates side by side on one routing (see gemm_lab.h).
#include "cuda/gemm_lab.h"

#include <cublas_v2.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "cuda/blas.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/device_memory.h"
#include "cuda/event_timing.h"
#include "cuda/grouped_gemm.h"

namespace moeforge::cuda {
namespace {

// The weight gradient is timed both ways: assigned (the first micro-batch of a step, what a
// one-micro-batch step runs) and accumulated (the later micro-batches).
enum class Product { kForward, kBackwardInput, kBackwardWeight, kBackwardWeightAccumulate };

bool is_weight_gradient(Product p) {
  return p == Product::kBackwardWeight || p == Product::kBackwardWeightAccumulate;
}

// cuBLAS's grouped batched GEMM, one group of one matrix per expert (column-major view of the
// row-major operands). Throws when cuBLAS does not run the combination.
class CublasGrouped {
 public:
  CublasGrouped() { MF_CUBLAS_CHECK(cublasCreate(&handle_)); }
  ~CublasGrouped() { cublasDestroy(handle_); }
  CublasGrouped(const CublasGrouped&) = delete;
  CublasGrouped& operator=(const CublasGrouped&) = delete;

  void run(Product product, void* out, const bf16* a_rows, const bf16* w,
           const std::vector<int64_t>& offsets, int in, int out_features) {
    const auto num_experts = static_cast<int>(offsets.size()) - 1;
    std::vector<cublasOperation_t> ta, tb;
    std::vector<int> m, n, k, lda, ldb, ldc, sizes;
    std::vector<const void*> a, b;
    std::vector<void*> c;
    std::vector<float> alpha, beta;
    for (int e = 0; e < num_experts; ++e) {
      const int64_t begin = offsets[e];
      const int count = static_cast<int>(offsets[e + 1] - begin);
      if (count == 0) continue;
      const bf16* w_e = w + static_cast<int64_t>(e) * out_features * in;
      switch (product) {
        case Product::kForward:  // y^T [out, count] = W_e^T' x^T
          ta.push_back(CUBLAS_OP_T), tb.push_back(CUBLAS_OP_N);
          m.push_back(out_features), n.push_back(count), k.push_back(in);
          a.push_back(w_e), lda.push_back(in), b.push_back(a_rows + begin * in), ldb.push_back(in);
          c.push_back(static_cast<bf16*>(out) + begin * out_features), ldc.push_back(out_features);
          break;
        case Product::kBackwardInput:  // dx^T [in, count] = W_e^T dy^T
          ta.push_back(CUBLAS_OP_N), tb.push_back(CUBLAS_OP_N);
          m.push_back(in), n.push_back(count), k.push_back(out_features);
          a.push_back(w_e), lda.push_back(in), b.push_back(a_rows + begin * out_features);
          ldb.push_back(out_features);
          c.push_back(static_cast<bf16*>(out) + begin * in), ldc.push_back(in);
          break;
        case Product::kBackwardWeight:
        case Product::kBackwardWeightAccumulate:  // dW_e^T [in, out] (+)= x^T dy (a_rows = dy, w =
                                                  // x)
          ta.push_back(CUBLAS_OP_N), tb.push_back(CUBLAS_OP_T);
          m.push_back(in), n.push_back(out_features), k.push_back(count);
          a.push_back(w + begin * in), lda.push_back(in);
          b.push_back(a_rows + begin * out_features), ldb.push_back(out_features);
          c.push_back(static_cast<float*>(out) + static_cast<int64_t>(e) * out_features * in);
          ldc.push_back(in);
          break;
      }
      alpha.push_back(1.0f);
      beta.push_back(product == Product::kBackwardWeightAccumulate ? 1.0f : 0.0f);
      sizes.push_back(1);
    }
    const size_t groups = sizes.size();
    if (pointers_.size() < 3 * groups) pointers_.resize(3 * groups);
    std::vector<const void*> host(3 * groups);
    std::copy(a.begin(), a.end(), host.begin());
    std::copy(b.begin(), b.end(), host.begin() + static_cast<int64_t>(groups));
    std::copy(c.begin(), c.end(), host.begin() + 2 * static_cast<int64_t>(groups));
    MF_CUDA_CHECK(cudaMemcpyAsync(pointers_.data(), host.data(), host.size() * sizeof(void*),
                                  cudaMemcpyHostToDevice, nullptr));
    const void* const* dev = pointers_.data();
    const cudaDataType_t c_type = is_weight_gradient(product) ? CUDA_R_32F : CUDA_R_16BF;
    MF_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        handle_, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(), dev, CUDA_R_16BF,
        lda.data(), dev + groups, CUDA_R_16BF, ldb.data(), beta.data(),
        const_cast<void* const*>(dev + 2 * groups), c_type, ldc.data(), static_cast<int>(groups),
        sizes.data(), CUBLAS_COMPUTE_32F));
  }

 private:
  cublasHandle_t handle_ = nullptr;
  DeviceBuffer<const void*> pointers_;
};

const char* product_name(Product p) {
  switch (p) {
    case Product::kForward: return "forward";
    case Product::kBackwardInput: return "backward_input";
    case Product::kBackwardWeight: return "backward_weight";
    case Product::kBackwardWeightAccumulate: return "backward_weight_accumulate";
  }
  return "";
}

}  // namespace

nlohmann::json run_gemm_lab(const GemmLabOptions& opt) {
  require_cuda_device();
  MF_CHECK(opt.tokens > 0 && opt.hidden > 0 && opt.expert_ffn > 0 && opt.num_experts > 0 &&
               opt.top_k > 0 && opt.top_k <= opt.num_experts && opt.repeats > 0,
           "bench gemm: sizes and --repeats must be positive and --top-k <= --experts");
  const int64_t rows = opt.tokens * opt.top_k, in = opt.hidden, out = opt.expert_ffn;
  // Row counts of a random routing (each assignment to a uniform expert).
  Rng rng(opt.seed);
  std::vector<int64_t> offsets(static_cast<size_t>(opt.num_experts) + 1, 0);
  for (int64_t r = 0; r < rows; ++r) ++offsets[rng.below(opt.num_experts) + 1];
  for (size_t e = 1; e < offsets.size(); ++e) offsets[e] += offsets[e - 1];
  std::vector<int32_t> offsets32(offsets.begin(), offsets.end());
  DeviceBuffer<int32_t> device_offsets;
  device_offsets.upload(offsets32);

  DeviceBuffer<bf16> x(static_cast<size_t>(rows * in)), dy(static_cast<size_t>(rows * out));
  DeviceBuffer<bf16> y(static_cast<size_t>(rows * out)), dx(static_cast<size_t>(rows * in));
  DeviceBuffer<bf16> w(static_cast<size_t>(opt.num_experts * out * in));
  DeviceBuffer<float> dw(w.size());
  // Random operands: GEMMs on zeros draw less power and run faster than on real data.
  const auto fill_random = [&rng](DeviceBuffer<bf16>& buffer, double scale) {
    std::vector<float> host(buffer.size());
    for (float& v : host) v = static_cast<float>(rng.normal() * scale);
    buffer.upload(to_bf16(host));
  };
  fill_random(x, 1.0);
  fill_random(dy, 1.0);
  fill_random(w, 0.02);
  zero_device(dw.data(), dw.bytes(), nullptr);

  Blas blas;
  // One GroupedGemm per compiled configuration (each runs it for all three products).
  std::vector<std::unique_ptr<GroupedGemm>> grouped;
  for (const GroupedGemmKernel kernel : kGroupedGemmKernels)
    grouped.push_back(std::make_unique<GroupedGemm>(GroupedGemmKernels{kernel, kernel, kernel}));
  CublasGrouped cublas_grouped;
  const ExpertGemmShape shape{opt.num_experts, in, out};
  const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(in * out);
  int64_t min_rows = rows, max_rows = 0;
  for (int64_t e = 0; e < opt.num_experts; ++e) {
    min_rows = std::min(min_rows, offsets[e + 1] - offsets[e]);
    max_rows = std::max(max_rows, offsets[e + 1] - offsets[e]);
  }
  nlohmann::json result{{"rows", rows},
                        {"hidden", in},
                        {"expert_ffn", out},
                        {"num_experts", opt.num_experts},
                        {"rows_per_expert_min", min_rows},
                        {"rows_per_expert_max", max_rows}};

  for (const Product product : {Product::kForward, Product::kBackwardInput,
                                Product::kBackwardWeight, Product::kBackwardWeightAccumulate}) {
    const bool accumulate = product == Product::kBackwardWeightAccumulate;
    std::vector<std::pair<std::string, std::function<void()>>> candidates;
    candidates.emplace_back("cublaslt_per_expert", [&] {
      for (int64_t e = 0; e < opt.num_experts; ++e) {
        const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
        if (count == 0) continue;
        const bf16* w_e = w.data() + e * out * in;
        if (product == Product::kForward) {
          blas.linear_forward(y.data() + begin * out, OutType::kBf16, x.data() + begin * in, w_e,
                              nullptr, count, in, out, false, nullptr);
        } else if (product == Product::kBackwardInput) {
          blas.linear_backward_input(dx.data() + begin * in, OutType::kBf16,
                                     dy.data() + begin * out, w_e, count, in, out, false, nullptr);
        } else {
          blas.linear_backward_weight(dw.data() + e * out * in, dy.data() + begin * out,
                                      x.data() + begin * in, count, in, out, accumulate, nullptr);
        }
      }
    });
    for (const auto& gemm : grouped) {
      if (!gemm->available(shape)) continue;
      const std::string name =
          std::string("cutlass_grouped_") + grouped_gemm_kernel_name(gemm->kernels().forward);
      candidates.emplace_back(name, [&, g = gemm.get()] {
        if (product == Product::kForward) {
          g->forward(y.data(), x.data(), w.data(), device_offsets.data(), shape, nullptr);
        } else if (product == Product::kBackwardInput) {
          g->backward_input(dx.data(), dy.data(), w.data(), device_offsets.data(), shape, false,
                            nullptr);
        } else {
          g->backward_weight(dw.data(), dy.data(), x.data(), device_offsets.data(), shape,
                             accumulate, nullptr);
        }
      });
    }
    candidates.emplace_back("cublas_grouped_batched", [&] {
      if (product == Product::kForward) {
        cublas_grouped.run(product, y.data(), x.data(), w.data(), offsets, static_cast<int>(in),
                           static_cast<int>(out));
      } else if (product == Product::kBackwardInput) {
        cublas_grouped.run(product, dx.data(), dy.data(), w.data(), offsets, static_cast<int>(in),
                           static_cast<int>(out));
      } else {
        cublas_grouped.run(product, dw.data(), dy.data(), x.data(), offsets, static_cast<int>(in),
                           static_cast<int>(out));
      }
    });
    candidates.emplace_back("dense_same_flops", [&] {
      if (product == Product::kForward) {
        blas.linear_forward(y.data(), OutType::kBf16, x.data(), w.data(), nullptr, rows, in, out,
                            false, nullptr);
      } else if (product == Product::kBackwardInput) {
        blas.linear_backward_input(dx.data(), OutType::kBf16, dy.data(), w.data(), rows, in, out,
                                   false, nullptr);
      } else {
        blas.linear_backward_weight(dw.data(), dy.data(), x.data(), rows, in, out, accumulate,
                                    nullptr);
      }
    });

    nlohmann::json times;
    for (auto& [name, fn] : candidates) {
      try {
        const double ms = median_event_ms(opt.repeats, fn);
        times[name] = {{"ms", ms}, {"tflops", flops / (ms * 1e9)}};
      } catch (const Error& error) {
        cudaGetLastError();
        times[name] = {{"error", error.what()}};
      }
    }
    if (times["dense_same_flops"].contains("ms")) {
      const double dense = times["dense_same_flops"]["ms"].get<double>();
      for (auto& [name, entry] : times.items()) {
        if (entry.contains("ms")) entry["over_dense"] = entry["ms"].get<double>() / dense;
      }
    }
    result[product_name(product)] = times;
  }
  return result;
}

}  // namespace moeforge::cuda
