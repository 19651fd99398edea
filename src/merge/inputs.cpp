// Input validation of merges (see inputs.h).
#include "merge/inputs.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <system_error>
#include <tuple>

#include "core/error.h"

namespace moeforge::merge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kConfigFile = "config.json";

// path is dir or lies inside it (both absolute and normalised).
bool is_within(const fs::path& path, const fs::path& dir) {
  const auto [dir_it, path_it] = std::mismatch(dir.begin(), dir.end(), path.begin(), path.end());
  return dir_it == dir.end();
}

json read_json(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  MF_CHECK(in.is_open(), "cannot open '{}': {}", path.string(), std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    MF_FAIL("{}: not valid JSON: {}", path.string(), e.what());
  }
}

void strip_version_fields(json& value) {
  if (value.is_object()) {
    for (const char* key : {"torch_dtype", "dtype", "transformers_version"}) value.erase(key);
    for (auto& [key, item] : value.items()) strip_version_fields(item);
  } else if (value.is_array()) {
    for (json& item : value) strip_version_fields(item);
  }
}

std::string describe_at(const json& config, const std::string& pointer) {
  const json::json_pointer at(pointer);
  return config.contains(at) ? config.at(at).dump() : std::string("absent");
}

std::string shape_string(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

void check_configs_match(const std::vector<InputModel>& inputs) {
  const InputModel& first = inputs.front();
  const std::optional<json> reference =
      first.config ? std::optional<json>(comparable_config(*first.config)) : std::nullopt;
  for (size_t input_idx = 1; input_idx < inputs.size(); ++input_idx) {
    const InputModel& input = inputs[input_idx];
    MF_CHECK(input.config.has_value() == first.config.has_value(),
             "input '{}' {} {} but input '{}' {}; all inputs must be checkpoints of one model",
             input.dir.string(), input.config ? "has" : "has no", kConfigFile, first.dir.string(),
             first.config ? "has one" : "has none");
    if (!reference) continue;
    const json config = comparable_config(*input.config);
    const json patch = json::diff(*reference, config);
    if (patch.empty()) continue;
    const std::string pointer = patch.front().at("path").get<std::string>();
    MF_FAIL(
        "{} of input '{}' differs from input '{}' at '{}' ({} vs {}); merged checkpoints must "
        "share one architecture and config (dtype and transformers_version fields may differ)",
        kConfigFile, input.dir.string(), first.dir.string(), pointer, describe_at(config, pointer),
        describe_at(*reference, pointer));
  }
}

void check_tensor_names_match(const InputModel& first, const InputModel& input) {
  const std::vector<std::string> expected = first.weights.names();
  const std::vector<std::string> found = input.weights.names();
  std::vector<std::string> missing;
  std::set_difference(expected.begin(), expected.end(), found.begin(), found.end(),
                      std::back_inserter(missing));
  MF_CHECK(missing.empty(), "tensor '{}' of input '{}' is missing from input '{}' ({} missing)",
           missing.empty() ? "" : missing.front(), first.dir.string(), input.dir.string(),
           missing.size());
  std::vector<std::string> extra;
  std::set_difference(found.begin(), found.end(), expected.begin(), expected.end(),
                      std::back_inserter(extra));
  MF_CHECK(extra.empty(), "input '{}' has tensor '{}' that input '{}' lacks ({} extra)",
           input.dir.string(), extra.empty() ? "" : extra.front(), first.dir.string(),
           extra.size());
}

void check_tensor_matches(const InputModel& first, const InputModel& input,
                          const std::string& name) {
  const io::TensorInfo& expected = first.weights.info(name);
  const io::TensorInfo& found = input.weights.info(name);
  MF_CHECK(found.dtype == expected.dtype,
           "tensor '{}' has dtype {} in input '{}' but {} in input '{}'; convert the inputs to "
           "one dtype first",
           name, io::dtype_name(found.dtype), input.dir.string(), io::dtype_name(expected.dtype),
           first.dir.string());
  MF_CHECK(found.shape == expected.shape,
           "tensor '{}' has shape {} in input '{}' but {} in input '{}'", name,
           shape_string(found.shape), input.dir.string(), shape_string(expected.shape),
           first.dir.string());
  if (io::is_convertible_float(found.dtype)) return;
  const std::span<const std::byte> a = first.weights.data(name);
  const std::span<const std::byte> b = input.weights.data(name);
  MF_CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()),
           "tensor '{}' ({}) differs between input '{}' and input '{}'; only floating tensors are "
           "averaged, other tensors must be equal in every input and are copied",
           name, io::dtype_name(found.dtype), first.dir.string(), input.dir.string());
}

}  // namespace

fs::path check_paths(const std::vector<fs::path>& inputs, const fs::path& output) {
  MF_CHECK(!inputs.empty(), "nothing to merge: no input checkpoints given");
  MF_CHECK(!output.empty(), "no output directory given");
  const fs::path target = output.filename().empty() ? output.parent_path() : output;
  std::error_code ec;
  const fs::path canonical_output = fs::weakly_canonical(fs::absolute(target), ec);
  MF_CHECK(!ec, "cannot resolve output path '{}': {}", target.string(), ec.message());
  std::vector<fs::path> canonical_inputs;
  for (const fs::path& input : inputs) {
    MF_CHECK(fs::is_directory(input), "input '{}' does not exist or is not a directory",
             input.string());
    const fs::path canonical = fs::canonical(input, ec);
    MF_CHECK(!ec, "cannot resolve input path '{}': {}", input.string(), ec.message());
    for (size_t earlier_idx = 0; earlier_idx < canonical_inputs.size(); ++earlier_idx) {
      MF_CHECK(canonical != canonical_inputs[earlier_idx],
               "input '{}' is given twice (inputs {} and {} are both '{}'); list each checkpoint "
               "once",
               input.string(), earlier_idx + 1, canonical_inputs.size() + 1, canonical.string());
    }
    MF_CHECK(!is_within(canonical_output, canonical),
             "output '{}' {} input '{}'; a merge never writes into its inputs: choose an output "
             "outside them",
             target.string(),
             canonical_output == canonical ? "is the same directory as" : "lies inside",
             input.string());
    canonical_inputs.push_back(canonical);
  }
  MF_CHECK(fs::symlink_status(target, ec).type() == fs::file_type::not_found,
           "output '{}' already exists; merge never overwrites: choose a new path or remove it "
           "first",
           target.string());
  return target;
}

std::vector<InputModel> open_inputs(const std::vector<fs::path>& inputs) {
  std::vector<InputModel> models;
  models.reserve(inputs.size());
  for (const fs::path& dir : inputs) {
    std::optional<json> config;
    if (fs::exists(dir / kConfigFile)) config = read_json(dir / kConfigFile);
    models.push_back(
        InputModel{dir, fs::canonical(dir), io::ModelWeights::open(dir), std::move(config)});
  }
  return models;
}

json comparable_config(const json& config) {
  json stripped = config;
  strip_version_fields(stripped);
  return stripped;
}

void check_inputs_match(const std::vector<InputModel>& inputs) {
  MF_CHECK(!inputs.empty(), "nothing to merge: no inputs");
  check_configs_match(inputs);
  const InputModel& first = inputs.front();
  for (const std::string& name : first.weights.names()) {
    const io::DType dtype = first.weights.info(name).dtype;
    MF_CHECK(io::is_convertible_float(dtype) ||
                 (dtype != io::DType::kF8E4M3 && dtype != io::DType::kF8E5M2),
             "tensor '{}' of input '{}' has dtype {}, which merge cannot average (F32, BF16, F16 "
             "and F64 are averaged; integer and bool tensors are copied)",
             name, first.dir.string(), io::dtype_name(dtype));
  }
  for (size_t input_idx = 1; input_idx < inputs.size(); ++input_idx) {
    check_tensor_names_match(first, inputs[input_idx]);
    for (const std::string& name : first.weights.names()) {
      check_tensor_matches(first, inputs[input_idx], name);
    }
  }
}

std::vector<std::string> file_order(const InputModel& model) {
  std::map<std::string, std::string> file_of;
  const fs::path index_path = model.dir / io::kWeightsIndexFile;
  if (fs::exists(index_path)) {
    const json index = read_json(index_path);
    for (const auto& [name, file] : index.at("weight_map").items()) {
      file_of[name] = file.get<std::string>();
    }
  }
  std::vector<std::tuple<std::string, uint64_t, std::string>> keyed;
  for (const std::string& name : model.weights.names()) {
    const auto it = file_of.find(name);
    keyed.emplace_back(it == file_of.end() ? std::string() : it->second,
                       model.weights.info(name).begin, name);
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<std::string> names;
  names.reserve(keyed.size());
  for (auto& [file, begin, name] : keyed) names.push_back(std::move(name));
  return names;
}

}  // namespace moeforge::merge
