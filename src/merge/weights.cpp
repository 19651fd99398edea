// Merge methods and their weights (SMA, EMA, WMA, custom), the accumulation modes, and the step and
// tokens of a checkpoint for provenance.
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "merge/merge.h"

namespace moeforge::merge {

namespace fs = std::filesystem;

Method parse_method(const std::string& name) {
  if (name == "sma") return Method::kSma;
  if (name == "ema") return Method::kEma;
  if (name == "wma") return Method::kWma;
  if (name == "custom") return Method::kCustom;
  MF_FAIL("unknown merge method '{}'; valid methods: sma, ema, wma, custom", name);
}

std::string method_name(Method method) {
  switch (method) {
    case Method::kSma: return "sma";
    case Method::kEma: return "ema";
    case Method::kWma: return "wma";
    case Method::kCustom: return "custom";
  }
  MF_FAIL("invalid merge Method value {}", static_cast<int>(method));
}

std::vector<double> merge_weights(Method method, int64_t num_inputs, double alpha,
                                  const std::vector<double>& custom) {
  MF_CHECK(num_inputs >= 1, "a merge needs at least one checkpoint, got {}", num_inputs);
  const auto n = static_cast<size_t>(num_inputs);
  std::vector<double> weights(n);
  switch (method) {
    case Method::kSma:
      for (double& w : weights) w = 1.0 / static_cast<double>(num_inputs);
      break;
    case Method::kWma: {
      // 2i / (N(N+1)): both integers are exact in fp64, so each weight is one rounding.
      const double denominator = static_cast<double>(num_inputs) * static_cast<double>(n + 1);
      for (size_t i = 0; i < n; ++i) weights[i] = 2.0 * static_cast<double>(i + 1) / denominator;
      break;
    }
    case Method::kEma: {
      MF_CHECK(std::isfinite(alpha) && alpha > 0.0 && alpha <= 1.0,
               "EMA alpha must lie in (0, 1], got {}", alpha);
      // The recursion M^(i) = a M_i + (1-a) M^(i-1) gives M_i the factor a (M_1: 1), then one
      // factor (1-a) per later checkpoint, multiplied in that order.
      const double decay = 1.0 - alpha;
      for (size_t i = 0; i < n; ++i) {
        double w = i == 0 ? 1.0 : alpha;
        for (size_t later = i + 1; later < n; ++later) w = decay * w;
        weights[i] = w;
      }
      break;
    }
    case Method::kCustom:
      MF_CHECK(custom.size() == n, "got {} custom weights for {} checkpoints; give one per input",
               custom.size(), num_inputs);
      for (size_t i = 0; i < n; ++i) {
        MF_CHECK(std::isfinite(custom[i]), "custom weight {} of input {} is not finite", custom[i],
                 i + 1);
      }
      weights = custom;
      break;
  }
  return weights;
}

std::string accumulate_name(Accumulate accumulate) {
  return accumulate == Accumulate::kFp64 ? "fp64" : "fp32";
}

Accumulate parse_accumulate(const std::string& name) {
  if (name == "fp32") return Accumulate::kFp32;
  if (name == "fp64") return Accumulate::kFp64;
  MF_FAIL("unknown accumulation '{}'; valid: fp32, fp64", name);
}

double effective_weight(double weight, Accumulate accumulate) {
  return accumulate == Accumulate::kFp64 ? weight : static_cast<double>(static_cast<float>(weight));
}

InputInfo read_input_info(const fs::path& dir) {
  const fs::path path = dir / "trainer_state.json";
  std::ifstream in(path);
  if (!in.is_open()) return {};
  const nlohmann::json state = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  InputInfo info;
  if (!state.is_object()) return info;
  if (state.contains("step") && state["step"].is_number_integer()) {
    info.step = state["step"].get<int64_t>();
  }
  if (state.contains("tokens_seen") && state["tokens_seen"].is_number_integer()) {
    info.tokens_seen = state["tokens_seen"].get<int64_t>();
  }
  return info;
}

}  // namespace moeforge::merge
