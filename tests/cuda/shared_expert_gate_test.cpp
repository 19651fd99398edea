// The shared expert's sigmoid gate on the GPU (cuda/shared_expert_gate.h) against fp64 loops of
// model/moe_ffn.cpp's math on the same bf16 / fp32 inputs: the forward (the assigned scores and the
// accumulated output), the backward (the assigned gradients of the shared output and of the
// logits, the accumulated input gradient) and the accumulated gate weight gradient, for hidden
// sizes below, at and above the 128-thread block and token counts around the weight gradient's
// 256-row chunks. A fifth of the tokens have logits of standard deviation 24 (saturated scores).
//
// Bounds per element (fp32 arithmetic on exact inputs, u = 2^-24; bf16 x bf16 products are exact):
// - a dot product of h terms summed in fp32, in any order: (h + 2) u sum |term| (the classic
//   gamma_h bound, one more u for fp32 x bf16 products);
// - score = sigmoid(logit): a logit error e moves it by at most s (1 - s) e; expf (2 ulp, up to
//   4 u relative), 1 + t and the division (u each) add at most 6 u s: 8 u s allowed, plus 2^-126
//   (for logits below -88 expf overflows and the score underflows to 0);
// - out = out0 + s * shared: |shared| times the score's bound, plus 2 u (|out0| + |s shared|);
// - dshared_out = s * dout rounded to bf16: one bf16 ulp of the reference plus u |reference|;
// - dlogit = dot * s * (1 - s): s (1 - s) times the dot's bound, plus 3 u |dlogit| (1 - s and two
//   products); dx = dx0 + dlogit * w: |w| times dlogit's bound, plus 2 u (|dx0| + |dlogit w|);
// - dw = dw0 + sum_t dlogit_t x_t: (n + 3) u (|dw0| + sum |dlogit_t x_t|) (each term's product,
//   at most n additions over the chunks and their sum, and the add to dw0).
// A missing factor (s (1 - s), the score), a lost accumulation or a wrong row gives errors of the
// order of the values themselves, far above these bounds; NaN (an unwritten output) always fails.
#include "cuda/shared_expert_gate.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

// Normed-input-like rows [n, h] (standard normal), every fifth one scaled by 8 so that its logit
// saturates the sigmoid; and a gate weight [h] giving logits of standard deviation about 3.
std::vector<bf16> gate_inputs(int64_t n, int64_t h, uint64_t seed) {
  const auto rows = static_cast<size_t>(n), cols = static_cast<size_t>(h);
  std::vector<float> x = testing::random_normal(rows * cols, seed);
  for (size_t t = 0; t < rows; t += 5) {
    for (size_t i = 0; i < cols; ++i) x[t * cols + i] *= 8.0f;
  }
  return to_bf16(x);
}

std::vector<bf16> gate_weight(int64_t h, uint64_t seed) {
  return to_bf16(testing::random_normal(static_cast<size_t>(h), seed,
                                        3.0 / std::sqrt(static_cast<double>(h))));
}

// logit [t] = x[t] . w in fp64, and the bound on an fp32 sum of the same terms.
void reference_logits(std::vector<double>& logit, std::vector<double>& logit_bound,
                      const std::vector<double>& x, const std::vector<double>& w, int64_t n,
                      int64_t h) {
  const auto rows = static_cast<size_t>(n), cols = static_cast<size_t>(h);
  logit.assign(rows, 0.0);
  logit_bound.assign(rows, 0.0);
  for (size_t t = 0; t < rows; ++t) {
    double sum = 0.0, magnitude = 0.0;
    for (size_t i = 0; i < cols; ++i) {
      const double term = x[t * cols + i] * w[i];
      sum += term;
      magnitude += std::abs(term);
    }
    logit[t] = sum;
    logit_bound[t] = static_cast<double>(cols + 2) * kFloatEps * magnitude;
  }
}

void check_forward(int64_t n, int64_t h, uint64_t seed) {
  const auto rows = static_cast<size_t>(n), cols = static_cast<size_t>(h);
  SCOPED_TRACE("n=" + std::to_string(n) + " h=" + std::to_string(h));
  const std::vector<bf16> x = gate_inputs(n, h, seed), w = gate_weight(h, seed + 1);
  const std::vector<bf16> shared = to_bf16(testing::random_normal(rows * cols, seed + 2));
  const std::vector<float> out0 = testing::random_normal(rows * cols, seed + 3);
  const std::vector<double> x_d = to_double(x), w_d = to_double(w), shared_d = to_double(shared);

  std::vector<double> logit, logit_bound;
  reference_logits(logit, logit_bound, x_d, w_d, n, h);
  std::vector<double> score_ref(rows), score_bound(rows);
  std::vector<double> out_ref(rows * cols), out_bound(rows * cols);
  for (size_t t = 0; t < rows; ++t) {
    const double s = sigmoid(logit[t]);
    score_ref[t] = s;
    score_bound[t] = s * (1.0 - s) * logit_bound[t] + 8.0 * kFloatEps * s + 0x1.0p-126;
    for (size_t i = 0; i < cols; ++i) {
      const size_t j = t * cols + i;
      const double weighted = s * shared_d[j];
      out_ref[j] = out0[j] + weighted;
      out_bound[j] =
          std::abs(shared_d[j]) * score_bound[t] +
          2.0 * kFloatEps * (std::abs(static_cast<double>(out0[j])) + std::abs(weighted));
    }
  }

  DeviceBuffer<bf16> x_dev = to_device(x), w_dev = to_device(w), shared_dev = to_device(shared);
  DeviceBuffer<float> out = to_device(out0), score(rows);
  testing::fill_garbage(score);
  shared_expert_gate_forward(out.data(), score.data(), x_dev.data(), w_dev.data(),
                             shared_dev.data(), n, h, nullptr);
  expect_close("score", download_double(score), score_ref, score_bound);
  expect_close("out", download_double(out), out_ref, out_bound);
}

void check_backward(int64_t n, int64_t h, uint64_t seed) {
  const auto rows = static_cast<size_t>(n), cols = static_cast<size_t>(h);
  SCOPED_TRACE("n=" + std::to_string(n) + " h=" + std::to_string(h));
  const std::vector<bf16> w = gate_weight(h, seed);
  const std::vector<bf16> shared = to_bf16(testing::random_normal(rows * cols, seed + 1));
  const std::vector<float> dout = testing::random_normal(rows * cols, seed + 2);
  const std::vector<float> dx0 = testing::random_normal(rows * cols, seed + 3);
  // Scores over (0, 1), the saturated ends included.
  std::vector<float> score = testing::random_uniform(rows, seed + 4, 0.0, 1.0);
  for (size_t t = 0; t < rows; t += 5) score[t] = t % 2 == 0 ? 1e-9f : 1.0f - 0x1.0p-24f;
  const std::vector<double> w_d = to_double(w), shared_d = to_double(shared);

  std::vector<double> dshared_ref(rows * cols), dshared_bound(rows * cols);
  std::vector<double> dlogit_ref(rows), dlogit_bound(rows);
  std::vector<double> dx_ref(rows * cols), dx_bound(rows * cols);
  for (size_t t = 0; t < rows; ++t) {
    const double s = score[t];
    double dot = 0.0, magnitude = 0.0;
    for (size_t i = 0; i < cols; ++i) {
      const size_t j = t * cols + i;
      dot += static_cast<double>(dout[j]) * shared_d[j];
      magnitude += std::abs(static_cast<double>(dout[j]) * shared_d[j]);
      dshared_ref[j] = s * static_cast<double>(dout[j]);
      dshared_bound[j] = testing::bf16_ulp(dshared_ref[j]) + kFloatEps * std::abs(dshared_ref[j]);
    }
    const double dl = dot * s * (1.0 - s);
    dlogit_ref[t] = dl;
    dlogit_bound[t] = s * (1.0 - s) * static_cast<double>(cols + 2) * kFloatEps * magnitude +
                      3.0 * kFloatEps * std::abs(dl);
    for (size_t i = 0; i < cols; ++i) {
      const size_t j = t * cols + i;
      dx_ref[j] = dx0[j] + dl * w_d[i];
      dx_bound[j] =
          std::abs(w_d[i]) * dlogit_bound[t] +
          2.0 * kFloatEps * (std::abs(static_cast<double>(dx0[j])) + std::abs(dl * w_d[i]));
    }
  }

  DeviceBuffer<bf16> w_dev = to_device(w), shared_dev = to_device(shared), dshared(rows * cols);
  DeviceBuffer<float> dout_dev = to_device(dout), score_dev = to_device(score);
  DeviceBuffer<float> dx = to_device(dx0), dlogit(rows);
  testing::fill_garbage(dshared);
  testing::fill_garbage(dlogit);
  shared_expert_gate_backward(dshared.data(), dlogit.data(), dx.data(), dout_dev.data(),
                              shared_dev.data(), score_dev.data(), w_dev.data(), n, h, nullptr);
  expect_close("dshared_out", download_double(dshared), dshared_ref, dshared_bound);
  expect_close("dlogit", download_double(dlogit), dlogit_ref, dlogit_bound);
  expect_close("dx", download_double(dx), dx_ref, dx_bound);
}

void check_backward_weight(int64_t n, int64_t h, uint64_t seed) {
  const auto rows = static_cast<size_t>(n), cols = static_cast<size_t>(h);
  SCOPED_TRACE("n=" + std::to_string(n) + " h=" + std::to_string(h));
  const std::vector<bf16> x = gate_inputs(n, h, seed);
  const std::vector<float> dlogit = testing::random_normal(rows, seed + 1, 0.1);
  const std::vector<float> dw0 = testing::random_normal(cols, seed + 2);
  const std::vector<double> x_d = to_double(x);
  std::vector<double> dw_ref(cols), dw_bound(cols);
  for (size_t i = 0; i < cols; ++i) {
    double sum = dw0[i], magnitude = std::abs(static_cast<double>(dw0[i]));
    for (size_t t = 0; t < rows; ++t) {
      const double term = static_cast<double>(dlogit[t]) * x_d[t * cols + i];
      sum += term;
      magnitude += std::abs(term);
    }
    dw_ref[i] = sum;
    dw_bound[i] = static_cast<double>(rows + 3) * kFloatEps * magnitude;
  }

  DeviceBuffer<bf16> x_dev = to_device(x);
  DeviceBuffer<float> dlogit_dev = to_device(dlogit), dw = to_device(dw0);
  shared_expert_gate_backward_weight(dw.data(), dlogit_dev.data(), x_dev.data(), n, h, nullptr);
  testing::synchronize();
  const std::vector<float> first = dw.download();
  expect_close("dw", to_double(first), dw_ref, dw_bound);

  // A fixed order of sums: a second run from the same dw0 gives the same bits.
  dw.upload(dw0);
  shared_expert_gate_backward_weight(dw.data(), dlogit_dev.data(), x_dev.data(), n, h, nullptr);
  testing::synchronize();
  testing::expect_equal("dw rerun", dw.download(), first);
}

TEST(SharedExpertGateCuda, ForwardMatchesReference) {
  MF_REQUIRE_GPU();
  for (const auto& [n, h] : {std::pair<int64_t, int64_t>{1, 96}, {37, 100}, {300, 2051}, {64, 128}})
    check_forward(n, h, static_cast<uint64_t>(n * 7 + h));
}

TEST(SharedExpertGateCuda, BackwardMatchesReference) {
  MF_REQUIRE_GPU();
  for (const auto& [n, h] : {std::pair<int64_t, int64_t>{1, 96}, {37, 100}, {300, 2051}, {64, 128}})
    check_backward(n, h, static_cast<uint64_t>(n * 11 + h));
}

TEST(SharedExpertGateCuda, WeightGradientMatchesReference) {
  MF_REQUIRE_GPU();
  for (const int64_t n : {1, 255, 256, 257, 1000}) {
    for (const int64_t h : {96, 300})
      check_backward_weight(n, h, static_cast<uint64_t>(n * 13 + h));
  }
}

// Checked on the host before any launch, so this runs without a GPU too.
TEST(SharedExpertGateCuda, BadDimensionsAreClearErrors) {
  EXPECT_THROW(
      shared_expert_gate_forward(nullptr, nullptr, nullptr, nullptr, nullptr, -1, 96, nullptr),
      Error);
  EXPECT_THROW(shared_expert_gate_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                           nullptr, 4, 0, nullptr),
               Error);
  EXPECT_THROW(
      shared_expert_gate_backward_weight(nullptr, nullptr, nullptr, int64_t{1} << 31, 96, nullptr),
      Error);
  // No tokens: nothing to do, no launch.
  EXPECT_NO_THROW(
      shared_expert_gate_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 96, nullptr));
}

}  // namespace
}  // namespace moeforge::cuda
