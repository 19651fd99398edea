// Export and import of HF model directories (see model_io.h).
#include "model/model_io.h"

#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/model_weights.h"

namespace moeforge {

namespace {

// Tensors that HF checkpoints may carry and that hold nothing we need.
bool is_ignorable_tensor(const std::string& name) {
  return name.ends_with("rotary_emb.inv_freq");
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

template <typename T>
void write_hf_model(const std::filesystem::path& dir, const ModelConfig& config,
                    const ParameterLayout& layout, const T* params, io::DType dtype,
                    uint64_t max_shard_bytes) {
  MF_CHECK(dtype == io::DType::kF32 || dtype == io::DType::kBF16 || dtype == io::DType::kF16,
           "model weights can be written as F32, BF16 or F16, not {}", io::dtype_name(dtype));
  ModelConfig out_config = config;
  out_config.torch_dtype = dtype == io::DType::kF32    ? "float32"
                           : dtype == io::DType::kBF16 ? "bfloat16"
                                                       : "float16";
  const std::string config_text = model_config_to_json(out_config).dump(2) + "\n";
  io::write_file_atomic(dir / "config.json",
                        std::as_bytes(std::span(config_text.data(), config_text.size())));

  const size_t elem = io::dtype_size(dtype);
  std::vector<std::byte> converted(static_cast<size_t>(layout.num_params()) * elem);
  std::vector<float> staging;
  std::vector<io::TensorView> views;
  for (const ParamSpec& spec : layout.specs()) {
    std::byte* dst = converted.data() + spec.offset * elem;
    staging.assign(params + spec.offset, params + spec.offset + spec.numel);
    io::convert_from_float(dtype, staging.data(), dst, static_cast<size_t>(spec.numel));
    views.push_back(io::TensorView{spec.name, dtype, spec.shape,
                                   std::span<const std::byte>(dst, spec.numel * elem)});
  }
  io::write_model_weights(dir, views, {{"format", "pt"}}, max_shard_bytes);
}

template <typename T>
void read_hf_weights(const std::filesystem::path& dir, const ParameterLayout& layout, T* params) {
  const io::ModelWeights weights = io::ModelWeights::open(dir);
  std::set<std::string> expected;
  for (const ParamSpec& spec : layout.specs()) {
    expected.insert(spec.name);
    MF_CHECK(weights.contains(spec.name), "{}: tensor {} is missing (config.json expects it)",
             dir.string(), spec.name);
    const io::TensorInfo& info = weights.info(spec.name);
    MF_CHECK(info.shape == spec.shape, "{}: tensor {} has shape {}, config.json implies {}",
             dir.string(), spec.name, shape_string(info.shape), shape_string(spec.shape));
    if constexpr (std::is_same_v<T, float>) {
      weights.read_as_float(spec.name, params + spec.offset, static_cast<size_t>(spec.numel));
    } else {
      weights.read_as_double(spec.name, params + spec.offset, static_cast<size_t>(spec.numel));
    }
  }
  // A shard of the experts reads its own; the other shards' are the model's too.
  std::optional<ParameterLayout> whole;
  if (layout.experts_sharded()) whole.emplace(layout.config());
  for (const std::string& name : weights.names()) {
    // A tied model's file may still carry lm_head.weight; it is the embedding, so skip it.
    if (expected.contains(name) || is_ignorable_tensor(name) || name == "lm_head.weight") continue;
    if (whole && whole->find(name) != nullptr) continue;
    MF_FAIL(
        "{}: tensor {} does not belong to this architecture (is config.json the one these "
        "weights were saved with?)",
        dir.string(), name);
  }
}

std::unique_ptr<Transformer<float>> load_transformer(const std::filesystem::path& dir,
                                                     Communicator& ep) {
  auto model = std::make_unique<Transformer<float>>(load_model_config(dir / "config.json"), ep);
  read_hf_weights(dir, model->layout(), model->params().data());
  return model;
}

template void write_hf_model<float>(const std::filesystem::path&, const ModelConfig&,
                                    const ParameterLayout&, const float*, io::DType, uint64_t);
template void write_hf_model<double>(const std::filesystem::path&, const ModelConfig&,
                                     const ParameterLayout&, const double*, io::DType, uint64_t);
template void read_hf_weights<float>(const std::filesystem::path&, const ParameterLayout&, float*);
template void read_hf_weights<double>(const std::filesystem::path&, const ParameterLayout&,
                                      double*);

}  // namespace moeforge
