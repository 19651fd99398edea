// AdamW against the update written out from its definition (PyTorch semantics, decoupled decay),
// the no-decay selection by name, and gradient-norm clipping.
#include "train/adamw.h"

#include <gtest/gtest.h>

#include <cmath>

#include "model/parameters.h"

namespace moeforge {
namespace {

ModelConfig tiny_llama() {
  ModelConfig c;
  c.vocab_size = 5;
  c.hidden_size = 4;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 2;
  c.intermediate_size = 3;
  c.max_position_embeddings = 8;
  return c;
}

TEST(AdamW, MatchesTheDefinitionOverSeveralSteps) {
  const ParameterLayout layout(tiny_llama());
  const AdamWHyper hyper{0.9, 0.95, 1e-8, 0.1};
  AdamW opt(layout, hyper, {"norm", "embed_tokens"});
  const int64_t n = layout.num_params();
  std::vector<float> params(n), grads(n);
  std::vector<double> p(n), m(n, 0.0), v(n, 0.0);
  for (int64_t i = 0; i < n; ++i) params[i] = p[i] = 0.01 * static_cast<double>(i % 17) - 0.05;
  for (int step = 1; step <= 3; ++step) {
    const double lr = 1e-2 * step;
    for (int64_t i = 0; i < n; ++i) grads[i] = static_cast<float>(std::sin(0.3 * i + step));
    opt.step(params.data(), grads.data(), lr);
    for (const ParamSpec& spec : layout.specs()) {
      const bool decay = spec.name.find("norm") == std::string::npos &&
                         spec.name.find("embed_tokens") == std::string::npos;
      for (int64_t i = spec.offset; i < spec.offset + spec.numel; ++i) {
        const double g = grads[i];
        m[i] = hyper.beta1 * m[i] + (1 - hyper.beta1) * g;
        v[i] = hyper.beta2 * v[i] + (1 - hyper.beta2) * g * g;
        const double m_hat = m[i] / (1 - std::pow(hyper.beta1, step));
        const double v_hat = v[i] / (1 - std::pow(hyper.beta2, step));
        if (decay) p[i] *= 1 - lr * hyper.weight_decay;
        p[i] -= lr * m_hat / (std::sqrt(v_hat) + hyper.eps);
      }
    }
    for (int64_t i = 0; i < n; ++i)
      ASSERT_NEAR(params[i], p[i], 1e-6) << "step " << step << " i " << i;
  }
  EXPECT_EQ(opt.step_count(), 3);
  for (size_t s = 0; s < layout.specs().size(); ++s) {
    const std::string& name = layout.specs()[s].name;
    EXPECT_EQ(opt.decays(s), name.find("norm") == std::string::npos &&
                                 name.find("embed_tokens") == std::string::npos)
        << name;
  }
}

TEST(AdamW, ClippingScalesToTheMaximumNorm) {
  std::vector<float> g = {3.0f, 4.0f, 0.0f};
  const double norm = global_grad_norm(g.data(), 3);
  EXPECT_DOUBLE_EQ(norm, 5.0);
  const double factor = clip_grad_norm(g.data(), 3, norm, 1.0);
  EXPECT_NEAR(factor, 1.0 / (5.0 + 1e-6), 1e-15);
  EXPECT_NEAR(global_grad_norm(g.data(), 3), 1.0, 1e-6);
  std::vector<float> small = {0.3f, 0.4f};
  EXPECT_EQ(clip_grad_norm(small.data(), 2, 0.5, 1.0), 1.0);
  EXPECT_EQ(small[0], 0.3f);
  EXPECT_EQ(clip_grad_norm(g.data(), 3, 1.0, 0.0), 1.0);  // 0 turns clipping off
}

}  // namespace
}  // namespace moeforge
