// Fused cross-entropy on the GPU against ops/cross_entropy.h in fp64: losses and bf16 dlogits with
// dscale = 1 / num_counted, ignored targets, rows shifted by +-80 (max subtraction), and the
// losses-only mode without dlogits.
#include "cuda/cross_entropy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "ops/cross_entropy.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

void check_cross_entropy(int64_t rows, int64_t vocab, bool with_dlogits, uint64_t seed) {
  SCOPED_TRACE("rows=" + std::to_string(rows) + " vocab=" + std::to_string(vocab) +
               (with_dlogits ? " with dlogits" : " losses only"));
  std::vector<float> logits = testing::random_normal(rows * vocab, seed, 2.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float shift = r % 3 == 1 ? 80.0f : (r % 3 == 2 ? -80.0f : 0.0f);
    for (int64_t j = 0; j < vocab; ++j) logits[r * vocab + j] += shift;
  }
  std::vector<int32_t> targets = testing::random_ints(rows, seed + 1, vocab);
  for (int64_t r = 3; r < rows; r += 5) targets[r] = -1;
  targets[0] = static_cast<int32_t>(vocab - 1);
  if (rows > 2) targets[2] = 0;

  const std::vector<double> logits_d = to_double(logits);
  std::vector<double> losses_ref(rows), dlogits_ref(rows * vocab);
  int64_t num_counted = 0;
  ops::cross_entropy_forward<double>(losses_ref.data(), logits_d.data(), targets.data(), rows,
                                     vocab, &num_counted);
  ASSERT_GT(num_counted, 0);
  const float dscale = static_cast<float>(1.0 / static_cast<double>(num_counted));
  ops::cross_entropy_backward<double>(dlogits_ref.data(), logits_d.data(), targets.data(), rows,
                                      vocab, static_cast<double>(dscale));

  DeviceBuffer<float> logits_dev = to_device(logits), losses(rows);
  DeviceBuffer<float> dscale_dev = to_device(std::vector<float>{dscale});
  DeviceBuffer<int32_t> targets_dev = to_device(targets);
  DeviceBuffer<bf16> dlogits;
  testing::fill_garbage(losses);
  if (with_dlogits) {
    dlogits.resize(rows * vocab);
    testing::fill_garbage(dlogits);
  }
  cross_entropy_forward_backward(losses.data(), with_dlogits ? dlogits.data() : nullptr,
                                 logits_dev.data(), targets_dev.data(), rows, vocab,
                                 dscale_dev.data(), nullptr);

  // fp32 log-sum-exp: the max-subtracted sum of vocab exponentials (a tree of partial sums,
  // ~sqrt(vocab) roundings), an exp that may be approximate, the log and the subtraction.
  std::vector<double> loss_noise(rows, 0.0), dlogits_noise(rows * vocab, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;  // exactly 0
    const double x_target = logits_d[r * vocab + targets[r]];
    const double lse = losses_ref[r] + x_target;
    loss_noise[r] = kFloatEps * (16.0 * (std::abs(lse) + std::abs(x_target)) +
                                 4.0 * std::sqrt(static_cast<double>(vocab))) +
                    0x1.0p-18;
    for (int64_t j = 0; j < vocab; ++j) {
      const int64_t i = r * vocab + j;
      const double prob = std::exp(logits_d[i] - lse);
      dlogits_noise[i] = dscale * (prob * (loss_noise[r] + 0x1.0p-19) + 4.0 * kFloatEps);
    }
  }
  expect_close("losses", download_double(losses), losses_ref, loss_noise);
  if (with_dlogits) {
    expect_close("dlogits", download_double(dlogits), dlogits_ref,
                 testing::bf16_bound(dlogits_ref, dlogits_noise));
  }
}

TEST(CrossEntropyCuda, LossesAndDlogitsMatchReference) {
  MF_REQUIRE_GPU();
  check_cross_entropy(37, 1000, true, 1);
  check_cross_entropy(8, 50257, true, 2);
  check_cross_entropy(1, 100, true, 3);
  check_cross_entropy(5, 258, true, 4);
  // The register-resident kernel (vocabularies up to 32768, multiples of 4): a full row at the
  // largest size, one past a power-of-two chunk count (masked tail), and the two-pass vector
  // kernel just above it.
  check_cross_entropy(6, 32768, true, 7);
  check_cross_entropy(4, 4100, true, 8);
  check_cross_entropy(3, 32772, true, 9);
}

TEST(CrossEntropyCuda, LossesWithoutDlogits) {
  MF_REQUIRE_GPU();
  check_cross_entropy(37, 1000, false, 5);
  check_cross_entropy(3, 50257, false, 6);
  check_cross_entropy(3, 32768, false, 10);
}

}  // namespace
}  // namespace moeforge::cuda
