// cuBLASLt GEMMs against double-precision products of the same bf16 values: Blas::matmul for all
// four transpose combinations, bf16 and fp32 outputs, with and without accumulation, and the
// nn.Linear helpers against ops/linear.h. Bound per element: fp32 accumulation of k products,
// (k + 4) * 2^-23 * sum |a| |b| (+ |C| when accumulating), plus one bf16 ulp for bf16 outputs.
#include "cuda/blas.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "ops/linear.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::to_device;
using testing::to_double;

// Row-major [rows, cols] -> [cols, rows].
template <typename T>
std::vector<T> transpose(const std::vector<T>& x, int64_t rows, int64_t cols) {
  std::vector<T> t(x.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = x[i * cols + j];
  }
  return t;
}

// |A| |B| for A [m, k], B [k, n]: the scale of the rounding errors of each output element.
std::vector<double> abs_product(const std::vector<double>& a, const std::vector<double>& b,
                                int64_t m, int64_t n, int64_t k) {
  std::vector<double> c(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const double a_ip = std::abs(a[i * k + p]);
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += a_ip * std::abs(b[p * n + j]);
    }
  }
  return c;
}

// A [m, k] B [k, n] in double.
std::vector<double> product(const std::vector<double>& a, const std::vector<double>& b, int64_t m,
                            int64_t n, int64_t k) {
  std::vector<double> c(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const double a_ip = a[i * k + p];
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += a_ip * b[p * n + j];
    }
  }
  return c;
}

// Bound of an fp32-accumulated GEMM output (magnitude already includes |C| and |bias|).
std::vector<double> gemm_noise(const std::vector<double>& magnitude, int64_t k) {
  std::vector<double> noise(magnitude.size());
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = (k + 4) * 0x1.0p-23 * magnitude[i];
  return noise;
}

std::vector<double> output_bound(OutType out, const std::vector<double>& reference,
                                 const std::vector<double>& noise) {
  return out == OutType::kBf16 ? testing::bf16_bound(reference, noise) : noise;
}

// With bf16 output and accumulation, cuBLASLt's epilogue may round the product to bf16 before
// adding C (measured on H200): one more bf16 ulp of the product.
void add_epilogue_rounding(std::vector<double>& bound, OutType out, bool accumulate,
                           const std::vector<double>& product) {
  if (out != OutType::kBf16 || !accumulate) return;
  for (size_t i = 0; i < bound.size(); ++i) bound[i] += testing::bf16_ulp(product[i]);
}

// An output buffer of the given type holding start (bf16-rounded for bf16), or garbage when
// start is empty; its current values as doubles.
struct Output {
  OutType type;
  DeviceBuffer<bf16> bf16_values;
  DeviceBuffer<float> float_values;

  Output(OutType out, int64_t count, const std::vector<float>& start) : type(out) {
    if (out == OutType::kBf16) {
      bf16_values = start.empty() ? DeviceBuffer<bf16>(count) : to_device(to_bf16(start));
      if (start.empty()) testing::fill_garbage(bf16_values);
    } else {
      float_values = start.empty() ? DeviceBuffer<float>(count) : to_device(start);
      if (start.empty()) testing::fill_garbage(float_values);
    }
  }
  void* data() {
    return type == OutType::kBf16 ? static_cast<void*>(bf16_values.data())
                                  : static_cast<void*>(float_values.data());
  }
  std::vector<double> values() const {
    return type == OutType::kBf16 ? download_double(bf16_values) : download_double(float_values);
  }
};

// The values an output of type out holds when made from x.
std::vector<double> stored_values(OutType out, const std::vector<float>& x) {
  return to_double(out == OutType::kBf16 ? testing::round_to_bf16(x) : x);
}

const char* name_of(OutType out) {
  return out == OutType::kBf16 ? "bf16" : "fp32";
}

struct GemmCase {
  int64_t m, n, k;
};

TEST(BlasCuda, MatmulAllTransposesBothOutputsAndAccumulation) {
  MF_REQUIRE_GPU();
  Blas blas;
  uint64_t seed = 1;
  for (const GemmCase gc : {GemmCase{1, 1, 1}, GemmCase{37, 100, 64}, GemmCase{100, 37, 96},
                            GemmCase{128, 384, 2048}}) {
    const int64_t m = gc.m, n = gc.n, k = gc.k;
    // The logical operands op(A) [m, k] and op(B) [k, n]; each transpose combination stores them
    // differently, so one reference product serves all four.
    const std::vector<bf16> a = to_bf16(testing::random_normal(m * k, seed++));
    const std::vector<bf16> b = to_bf16(testing::random_normal(k * n, seed++));
    const std::vector<double> a_d = to_double(a), b_d = to_double(b);
    const std::vector<double> ab = product(a_d, b_d, m, n, k);
    const std::vector<double> ab_mag = abs_product(a_d, b_d, m, n, k);
    const std::vector<float> c_start = testing::random_normal(m * n, seed++, 4.0);
    for (const bool trans_a : {false, true}) {
      for (const bool trans_b : {false, true}) {
        DeviceBuffer<bf16> a_dev = to_device(trans_a ? transpose(a, m, k) : a);
        DeviceBuffer<bf16> b_dev = to_device(trans_b ? transpose(b, k, n) : b);
        for (const OutType out : {OutType::kBf16, OutType::kFloat}) {
          for (const bool accumulate : {false, true}) {
            SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) +
                         " k=" + std::to_string(k) + " trans_a=" + std::to_string(trans_a) +
                         " trans_b=" + std::to_string(trans_b) + " out=" + name_of(out) +
                         " accumulate=" + std::to_string(accumulate));
            Output c(out, m * n, accumulate ? c_start : std::vector<float>{});
            blas.matmul(c.data(), out, a_dev.data(), b_dev.data(),
                        MatmulShape{m, n, k, trans_a, trans_b}, accumulate, nullptr);
            std::vector<double> expected = ab, magnitude = ab_mag;
            if (accumulate) {
              const std::vector<double> start = stored_values(out, c_start);
              for (int64_t i = 0; i < m * n; ++i) {
                expected[i] += start[i];
                magnitude[i] += std::abs(start[i]);
              }
            }
            std::vector<double> bound = output_bound(out, expected, gemm_noise(magnitude, k));
            add_epilogue_rounding(bound, out, accumulate, ab);
            expect_close("C", c.values(), expected, bound);
          }
        }
      }
    }
  }
}

struct LinearCase {
  int64_t n, in, out_features;
};

const LinearCase kLinearCases[] = {{37, 96, 100}, {1, 1, 1}, {64, 2048, 384}, {257, 64, 1000}};

TEST(BlasCuda, LinearForwardMatchesReference) {
  MF_REQUIRE_GPU();
  Blas blas;
  uint64_t seed = 100;
  for (const LinearCase& lc : kLinearCases) {
    const int64_t n = lc.n, in = lc.in, out_f = lc.out_features;
    const std::vector<bf16> x = to_bf16(testing::random_normal(n * in, seed++));
    const std::vector<bf16> w = to_bf16(testing::random_normal(out_f * in, seed++, 0.1));
    const std::vector<float> bias = testing::random_normal(out_f, seed++);
    const std::vector<float> y_start = testing::random_normal(n * out_f, seed++);
    const std::vector<double> x_d = to_double(x), w_d = to_double(w), bias_d = to_double(bias);
    const std::vector<double> mag = abs_product(x_d, transpose(w_d, out_f, in), n, out_f, in);
    std::vector<double> gemm_ref(n * out_f);
    ops::linear_forward<double>(gemm_ref.data(), x_d.data(), w_d.data(), nullptr, n, in, out_f);
    DeviceBuffer<bf16> x_dev = to_device(x), w_dev = to_device(w);
    DeviceBuffer<float> bias_dev = to_device(bias);

    struct Mode {
      OutType out;
      bool with_bias, accumulate;
    };
    for (const Mode mode : {Mode{OutType::kBf16, true, false}, Mode{OutType::kBf16, true, true},
                            Mode{OutType::kBf16, false, false}, Mode{OutType::kFloat, false, true},
                            Mode{OutType::kFloat, false, false}}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " in=" + std::to_string(in) +
                   " out=" + std::to_string(out_f) + " " + name_of(mode.out) +
                   (mode.with_bias ? " bias" : "") + (mode.accumulate ? " accumulate" : ""));
      std::vector<double> expected(n * out_f);
      ops::linear_forward<double>(expected.data(), x_d.data(), w_d.data(),
                                  mode.with_bias ? bias_d.data() : nullptr, n, in, out_f);
      std::vector<double> magnitude = mag, gemm_part = gemm_ref;
      const std::vector<double> start = stored_values(mode.out, y_start);
      for (int64_t i = 0; i < n * out_f; ++i) {
        if (mode.with_bias) magnitude[i] += std::abs(bias_d[i % out_f]);
        if (mode.accumulate) {
          expected[i] += start[i];
          gemm_part[i] += start[i];
          magnitude[i] += std::abs(start[i]);
        }
      }
      std::vector<double> bound = output_bound(mode.out, expected, gemm_noise(magnitude, in));
      add_epilogue_rounding(bound, mode.out, mode.accumulate, gemm_ref);
      // The bias is added after the GEMM's own bf16 rounding: one more ulp of that value.
      if (mode.with_bias) {
        for (int64_t i = 0; i < n * out_f; ++i) bound[i] += testing::bf16_ulp(gemm_part[i]);
      }
      Output y(mode.out, n * out_f, mode.accumulate ? y_start : std::vector<float>{});
      blas.linear_forward(y.data(), mode.out, x_dev.data(), w_dev.data(),
                          mode.with_bias ? bias_dev.data() : nullptr, n, in, out_f, mode.accumulate,
                          nullptr);
      expect_close("y", y.values(), expected, bound);
    }
  }
}

// y = residual + x W^T into a separate (NaN-filled) output, the residual left as it was, and in
// place (y == residual).
TEST(BlasCuda, LinearForwardAddMatchesReference) {
  MF_REQUIRE_GPU();
  Blas blas;
  uint64_t seed = 500;
  for (const LinearCase& lc : kLinearCases) {
    const int64_t n = lc.n, in = lc.in, out_f = lc.out_features;
    const std::vector<bf16> x = to_bf16(testing::random_normal(n * in, seed++));
    const std::vector<bf16> w = to_bf16(testing::random_normal(out_f * in, seed++, 0.1));
    const std::vector<float> residual = testing::random_normal(n * out_f, seed++);
    const std::vector<double> x_d = to_double(x), w_d = to_double(w);
    std::vector<double> expected(n * out_f);
    ops::linear_forward<double>(expected.data(), x_d.data(), w_d.data(), nullptr, n, in, out_f);
    std::vector<double> magnitude = abs_product(x_d, transpose(w_d, out_f, in), n, out_f, in);
    for (int64_t i = 0; i < n * out_f; ++i) {
      expected[i] += residual[i];
      magnitude[i] += std::abs(residual[i]);
    }
    const std::vector<double> bound =
        output_bound(OutType::kFloat, expected, gemm_noise(magnitude, in));
    DeviceBuffer<bf16> x_dev = to_device(x), w_dev = to_device(w);
    for (const bool in_place : {false, true}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " in=" + std::to_string(in) +
                   " out=" + std::to_string(out_f) + (in_place ? " in place" : " separate"));
      DeviceBuffer<float> residual_dev = to_device(residual), y(n * out_f);
      testing::fill_garbage(y);
      float* out = in_place ? residual_dev.data() : y.data();
      blas.linear_forward_add(out, residual_dev.data(), x_dev.data(), w_dev.data(), n, in, out_f,
                              nullptr);
      expect_close("y", download_double(in_place ? residual_dev : y), expected, bound);
      if (!in_place) {
        EXPECT_EQ(residual_dev.download(), residual);
      }
    }
  }
}

TEST(BlasCuda, LinearBackwardInputMatchesReference) {
  MF_REQUIRE_GPU();
  Blas blas;
  uint64_t seed = 200;
  for (const LinearCase& lc : kLinearCases) {
    const int64_t n = lc.n, in = lc.in, out_f = lc.out_features;
    const std::vector<bf16> dy = to_bf16(testing::random_normal(n * out_f, seed++));
    const std::vector<bf16> w = to_bf16(testing::random_normal(out_f * in, seed++, 0.1));
    const std::vector<float> dx_start = testing::random_normal(n * in, seed++);
    const std::vector<double> dy_d = to_double(dy), w_d = to_double(w);
    std::vector<double> dx_ref(n * in), unused_dweight(out_f * in, 0.0);
    const std::vector<double> unused_x(n * in, 0.0);
    ops::linear_backward<double>(dx_ref.data(), unused_dweight.data(), nullptr, dy_d.data(),
                                 unused_x.data(), w_d.data(), n, in, out_f);
    const std::vector<double> mag = abs_product(dy_d, w_d, n, in, out_f);
    DeviceBuffer<bf16> dy_dev = to_device(dy), w_dev = to_device(w);
    for (const OutType out : {OutType::kBf16, OutType::kFloat}) {
      for (const bool accumulate : {false, true}) {
        SCOPED_TRACE("n=" + std::to_string(n) + " in=" + std::to_string(in) +
                     " out=" + std::to_string(out_f) + " " + name_of(out) +
                     (accumulate ? " accumulate" : ""));
        std::vector<double> expected = dx_ref, magnitude = mag;
        if (accumulate) {
          const std::vector<double> start = stored_values(out, dx_start);
          for (int64_t i = 0; i < n * in; ++i) {
            expected[i] += start[i];
            magnitude[i] += std::abs(start[i]);
          }
        }
        Output dx(out, n * in, accumulate ? dx_start : std::vector<float>{});
        blas.linear_backward_input(dx.data(), out, dy_dev.data(), w_dev.data(), n, in, out_f,
                                   accumulate, nullptr);
        std::vector<double> bound = output_bound(out, expected, gemm_noise(magnitude, out_f));
        add_epilogue_rounding(bound, out, accumulate, dx_ref);
        expect_close("dx", dx.values(), expected, bound);
      }
    }
  }
}

TEST(BlasCuda, LinearBackwardWeightAssignsAndAccumulates) {
  MF_REQUIRE_GPU();
  Blas blas;
  uint64_t seed = 300;
  for (const LinearCase& lc : kLinearCases) {
    for (const bool accumulate : {true, false}) {
      SCOPED_TRACE("n=" + std::to_string(lc.n) + " in=" + std::to_string(lc.in) + " out=" +
                   std::to_string(lc.out_features) + (accumulate ? " accumulate" : " assign"));
      const int64_t n = lc.n, in = lc.in, out_f = lc.out_features;
      const std::vector<bf16> dy = to_bf16(testing::random_normal(n * out_f, seed++));
      const std::vector<bf16> x = to_bf16(testing::random_normal(n * in, seed++));
      const std::vector<float> dw_start = testing::random_normal(out_f * in, seed++);
      const std::vector<double> dy_d = to_double(dy), x_d = to_double(x);
      std::vector<double> dw_ref =
          accumulate ? to_double(dw_start) : std::vector<double>(out_f * in, 0.0);
      const std::vector<double> unused_w(out_f * in, 0.0);
      ops::linear_backward<double>(nullptr, dw_ref.data(), nullptr, dy_d.data(), x_d.data(),
                                   unused_w.data(), n, in, out_f);
      std::vector<double> magnitude = abs_product(transpose(dy_d, n, out_f), x_d, out_f, in, n);
      if (accumulate) {
        for (int64_t i = 0; i < out_f * in; ++i) magnitude[i] += std::abs(dw_start[i]);
      }

      DeviceBuffer<bf16> dy_dev = to_device(dy), x_dev = to_device(x);
      DeviceBuffer<float> dw = to_device(dw_start);
      // Assigning must not read dw: it starts as NaN.
      if (!accumulate) testing::fill_garbage(dw);
      blas.linear_backward_weight(dw.data(), dy_dev.data(), x_dev.data(), n, in, out_f, accumulate,
                                  nullptr);
      expect_close("dw", download_double(dw), dw_ref, gemm_noise(magnitude, n));
    }
  }
}

}  // namespace
}  // namespace moeforge::cuda
