// Capture, writing and reading of one layer's prefill Q/K/V (see qkv_dump.h).
#include "infer/qkv_dump.h"

#include <fmt/ranges.h>

#include <charconv>
#include <cstring>
#include <map>
#include <span>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

namespace moeforge {
namespace {

constexpr const char* kFormat = "moeforge-prefill-qkv";
constexpr const char* kFormatVersion = "1";

std::span<const std::byte> bytes_of(const std::vector<float>& x) {
  return std::as_bytes(std::span<const float>(x));
}

int64_t metadata_int(const std::map<std::string, std::string>& metadata, const std::string& key,
                     const std::filesystem::path& path) {
  const auto it = metadata.find(key);
  MF_CHECK(it != metadata.end(), "{}: metadata has no \"{}\"", path.string(), key);
  const std::string& text = it->second;
  int64_t value = -1;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  MF_CHECK(error == std::errc() && end == text.data() + text.size() && value >= 0,
           "{}: metadata \"{}\" is \"{}\", not a non-negative integer", path.string(), key, text);
  return value;
}

std::vector<float> read_tensor(const io::SafetensorsFile& file, const std::string& name,
                               const std::vector<int64_t>& shape) {
  const io::TensorInfo* info = file.find(name);
  MF_CHECK(info != nullptr, "{}: no tensor \"{}\"", file.path().string(), name);
  MF_CHECK(info->dtype == io::DType::kF32, "{}: tensor \"{}\" is not F32", file.path().string(),
           name);
  MF_CHECK(info->shape == shape, "{}: tensor \"{}\" has shape [{}], expected [{}]",
           file.path().string(), name, fmt::join(info->shape, ", "), fmt::join(shape, ", "));
  std::vector<float> out(static_cast<size_t>(info->numel()));
  const std::span<const std::byte> data = file.data(*info);
  std::memcpy(out.data(), data.data(), data.size());
  return out;
}

}  // namespace

PrefillQkv capture_prefill_qkv(const Transformer<float>& model, const KvCache<float>& cache,
                               int64_t layer) {
  const ModelConfig& config = model.config();
  MF_CHECK(layer >= 0 && layer < config.num_layers, "--dump-qkv: layer {} is outside [0, {})",
           layer, config.num_layers);
  PrefillQkv out{
      layer, cache.length, config.num_heads, config.num_kv_heads, config.head_dim, {}, {}, {}};
  const int64_t qd = config.q_dim(), kvd = config.kv_dim();
  const std::vector<float>& q = model.last_queries(layer);
  MF_CHECK(static_cast<int64_t>(q.size()) >= cache.length * qd,
           "--dump-qkv: the last forward did not prefill {} positions", cache.length);
  out.q.assign(q.begin(), q.begin() + cache.length * qd);
  const auto l = static_cast<size_t>(layer);
  out.k.assign(cache.k[l].begin(), cache.k[l].begin() + cache.length * kvd);
  out.v.assign(cache.v[l].begin(), cache.v[l].begin() + cache.length * kvd);
  return out;
}

void write_prefill_qkv(const std::filesystem::path& path, const PrefillQkv& qkv) {
  const int64_t n = qkv.num_positions, d = qkv.head_dim;
  const std::vector<io::TensorView> tensors = {
      {"q", io::DType::kF32, {n, qkv.num_heads, d}, bytes_of(qkv.q)},
      {"k", io::DType::kF32, {n, qkv.num_kv_heads, d}, bytes_of(qkv.k)},
      {"v", io::DType::kF32, {n, qkv.num_kv_heads, d}, bytes_of(qkv.v)}};
  io::write_safetensors(path, tensors,
                        {{"format", kFormat},
                         {"format_version", kFormatVersion},
                         {"layer", std::to_string(qkv.layer)},
                         {"num_heads", std::to_string(qkv.num_heads)},
                         {"num_kv_heads", std::to_string(qkv.num_kv_heads)},
                         {"head_dim", std::to_string(qkv.head_dim)}});
}

PrefillQkv read_prefill_qkv(const std::filesystem::path& path) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(path);
  const auto& metadata = file.metadata();
  const auto format = metadata.find("format");
  MF_CHECK(format != metadata.end() && format->second == kFormat,
           "{}: not a Q/K/V dump of `moeforge generate --dump-qkv` (metadata \"format\" is not "
           "\"{}\")",
           path.string(), kFormat);
  const auto version = metadata.find("format_version");
  MF_CHECK(version != metadata.end() && version->second == kFormatVersion,
           "{}: unsupported format_version (this build reads \"{}\")", path.string(),
           kFormatVersion);
  PrefillQkv out;
  out.layer = metadata_int(metadata, "layer", path);
  out.num_heads = metadata_int(metadata, "num_heads", path);
  out.num_kv_heads = metadata_int(metadata, "num_kv_heads", path);
  out.head_dim = metadata_int(metadata, "head_dim", path);
  const io::TensorInfo* q = file.find("q");
  MF_CHECK(q != nullptr && !q->shape.empty(), "{}: no tensor \"q\" with a leading positions axis",
           path.string());
  out.num_positions = q->shape[0];
  const int64_t n = out.num_positions, d = out.head_dim;
  out.q = read_tensor(file, "q", {n, out.num_heads, d});
  out.k = read_tensor(file, "k", {n, out.num_kv_heads, d});
  out.v = read_tensor(file, "v", {n, out.num_kv_heads, d});
  return out;
}

}  // namespace moeforge
