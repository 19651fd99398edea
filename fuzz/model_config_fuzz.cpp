// Fuzz target: the Hugging Face config.json parser (moeforge::model_config_from_json) on arbitrary
// JSON text, the round trip through model_config_to_json, and the parameter layout of what it
// accepted. moeforge::Error is the expected outcome for bad input; anything else is a finding.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "fuzz_input.h"
#include "model/model_config.h"
#include "model/parameters.h"

namespace {

// The layout holds a handful of tensors per layer and expert: build it only for configs whose
// tensor count is small, so that the fuzzer explores sizes, not allocation of huge name lists.
constexpr int64_t kMaxLayoutLayers = 64;
constexpr int64_t kMaxLayoutExperts = 64;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;
  try {
    const ModelConfig config = model_config_from_json(j);
    if (model_config_from_json(model_config_to_json(config)) != config) __builtin_trap();
    if (config.num_layers <= kMaxLayoutLayers && config.num_experts <= kMaxLayoutExperts) {
      const ParameterLayout layout(config);
      int64_t num_params = 0;
      for (const ParamSpec& spec : layout.specs()) num_params += spec.numel;
      if (num_params != layout.num_params()) __builtin_trap();
    }
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
