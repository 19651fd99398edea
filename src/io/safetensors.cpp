// Safetensors reader (mmap + the validation rules of the reference implementation) and writer.
#include "io/safetensors.h"

#include "core/error.h"
#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <optional>
#include <set>
#include <string_view>
#include <unordered_set>

namespace moeforge::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kMetadataKey = "__metadata__";

// Product of the dimensions, or nullopt if a dimension is negative or the product overflows.
std::optional<int64_t> checked_numel(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (const int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(numel, dim, &numel)) return std::nullopt;
  }
  return numel;
}

// numel * dtype_size, or nullopt on overflow.
std::optional<uint64_t> checked_num_bytes(int64_t numel, DType dtype) {
  uint64_t num_bytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel), dtype_size(dtype), &num_bytes)) {
    return std::nullopt;
  }
  return num_bytes;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// Parses the header, failing on duplicate keys in any object (nlohmann keeps only one of them).
json parse_header(const std::string& file, std::string_view text) {
  std::vector<std::set<std::string>> open_object_keys;  // keys seen in each enclosing object
  std::string tensor_name;                              // latest top-level key
  const json::parser_callback_t on_event = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start: open_object_keys.emplace_back(); break;
      case json::parse_event_t::object_end: open_object_keys.pop_back(); break;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        const bool is_new = open_object_keys.back().insert(key).second;
        if (open_object_keys.size() == 1) {
          MF_CHECK(is_new, "{}: duplicate tensor name '{}' in the header", file, key);
          tensor_name = key;
        } else {
          MF_CHECK(is_new, "{}: duplicate key '{}' inside the header entry of '{}'", file, key,
                   tensor_name);
        }
        break;
      }
      default: break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), on_event);
  } catch (const json::exception& e) {
    MF_FAIL("{}: header is not valid UTF-8 JSON: {}", file, e.what());
  }
}

std::map<std::string, std::string> parse_metadata(const std::string& file, const json& value) {
  MF_CHECK(value.is_object(), "{}: {} must be an object of string values, found {}", file,
           kMetadataKey, value.type_name());
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    MF_CHECK(item.is_string(), "{}: {} entry '{}' must be a string, found {}", file, kMetadataKey,
             key, item.type_name());
    metadata[key] = item.get<std::string>();
  }
  return metadata;
}

TensorInfo parse_entry(const std::string& file, const std::string& name, const json& entry) {
  const std::string where = fmt::format("{}: tensor '{}'", file, name);
  MF_CHECK(entry.is_object(),
           "{}: header entry must be an object with dtype, shape and "
           "data_offsets, found {}",
           where, entry.type_name());
  for (const auto& [key, unused] : entry.items()) {
    MF_CHECK(key == "dtype" || key == "shape" || key == "data_offsets",
             "{}: unknown field '{}' (expected dtype, shape, data_offsets)", where, key);
  }
  TensorInfo info;
  info.name = name;

  MF_CHECK(entry.contains("dtype") && entry["dtype"].is_string(),
           "{}: missing or non-string 'dtype'", where);
  const std::string dtype_text = entry["dtype"].get<std::string>();
  const std::optional<DType> dtype = find_dtype(dtype_text);
  MF_CHECK(dtype.has_value(), "{}: unknown dtype '{}'; valid dtypes: {}", where, dtype_text,
           valid_dtype_names());
  info.dtype = *dtype;

  MF_CHECK(entry.contains("shape") && entry["shape"].is_array(), "{}: missing or non-array 'shape'",
           where);
  for (const json& dim : entry["shape"]) {
    MF_CHECK(dim.is_number_integer(), "{}: shape {} must hold integers", where,
             entry["shape"].dump());
    MF_CHECK(dim.is_number_unsigned(), "{}: shape {} has a negative dimension", where,
             entry["shape"].dump());
    MF_CHECK(dim.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX),
             "{}: shape {} has a dimension too large", where, entry["shape"].dump());
    info.shape.push_back(dim.get<int64_t>());
  }

  const json* offsets = entry.contains("data_offsets") ? &entry["data_offsets"] : nullptr;
  MF_CHECK(offsets != nullptr && offsets->is_array() && offsets->size() == 2 &&
               (*offsets)[0].is_number_unsigned() && (*offsets)[1].is_number_unsigned(),
           "{}: 'data_offsets' must be [begin, end] with two non-negative integers, found {}",
           where, offsets ? offsets->dump() : "nothing");
  info.begin = (*offsets)[0].get<uint64_t>();
  info.end = (*offsets)[1].get<uint64_t>();
  MF_CHECK(info.begin <= info.end, "{}: data_offsets [{}, {}) end before they begin", where,
           info.begin, info.end);

  const std::optional<int64_t> numel = checked_numel(info.shape);
  const std::optional<uint64_t> num_bytes =
      numel ? checked_num_bytes(*numel, info.dtype) : std::nullopt;
  MF_CHECK(num_bytes.has_value(), "{}: shape {} has too many elements", where,
           shape_string(info.shape));
  MF_CHECK(info.end - info.begin == *num_bytes,
           "{}: data_offsets [{}, {}) hold {} bytes but dtype {} with shape {} needs {} bytes",
           where, info.begin, info.end, info.end - info.begin, dtype_text, shape_string(info.shape),
           *num_bytes);
  return info;
}

// Tensors sorted by offset must tile [0, buffer_size) exactly.
void check_layout(const std::string& file, const std::vector<TensorInfo>& tensors,
                  uint64_t buffer_size) {
  uint64_t expected_begin = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& info : tensors) {
    if (info.begin < expected_begin) {
      MF_FAIL("{}: tensor '{}' data_offsets [{}, {}) overlap the previous tensor '{}' [{}, {})",
              file, info.name, info.begin, info.end, previous->name, previous->begin,
              previous->end);
    }
    if (info.begin > expected_begin) {
      MF_FAIL("{}: tensor '{}' data_offsets [{}, {}) leave a hole of {} bytes after {}", file,
              info.name, info.begin, info.end, info.begin - expected_begin,
              previous
                  ? fmt::format("tensor '{}' (which ends at {})", previous->name, previous->end)
                  : std::string("the start of the data buffer (the first tensor must "
                                "begin at 0)"));
    }
    expected_begin = info.end;
    previous = &info;
  }
  if (expected_begin > buffer_size) {
    MF_FAIL(
        "{}: data buffer is truncated: tensor '{}' ends at byte {} of the data buffer but the "
        "file holds only {} bytes of data after the header",
        file, previous->name, expected_begin, buffer_size);
  }
  MF_CHECK(expected_begin == buffer_size,
           "{}: {} trailing bytes after the end of the last tensor's data (the data buffer is {} "
           "bytes, the tensors cover {})",
           file, buffer_size - expected_begin, buffer_size, expected_begin);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t numel = 1;
  for (const int64_t dim : shape) numel *= dim;
  return numel;
}

struct SafetensorsFile::Mapping {
  void* address = nullptr;
  size_t num_bytes = 0;
  ~Mapping() { ::munmap(address, num_bytes); }
};

SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const fs::path& path) {
  const std::string file = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MF_CHECK(fd >= 0, "cannot open safetensors file '{}': {}", file, std::strerror(errno));
  struct stat st {};
  const int stat_result = ::fstat(fd, &st);
  const int stat_errno = errno;
  if (stat_result != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    MF_FAIL("cannot read safetensors file '{}': {}", file,
            stat_result != 0 ? std::strerror(stat_errno) : "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    MF_FAIL(
        "{}: file is only {} bytes, shorter than the 8-byte header length field (truncated or "
        "not a safetensors file)",
        file, file_size);
  }
  void* address = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_errno = errno;
  ::close(fd);
  MF_CHECK(address != MAP_FAILED, "cannot mmap safetensors file '{}': {}", file,
           std::strerror(mmap_errno));

  SafetensorsFile result;
  result.path_ = path;
  result.mapping_ = std::make_unique<Mapping>();
  result.mapping_->address = address;
  result.mapping_->num_bytes = file_size;
  const auto* bytes = static_cast<const std::byte*>(address);

  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes, 8);  // little-endian host (static_assert in dtype.cpp)
  MF_CHECK(header_size <= kMaxSafetensorsHeaderBytes,
           "{}: header length {} exceeds the limit of {} bytes (corrupt or not a safetensors file)",
           file, header_size, kMaxSafetensorsHeaderBytes);
  MF_CHECK(8 + header_size <= file_size,
           "{}: header length {} runs past the end of the file ({} bytes; truncated file?)", file,
           header_size, file_size);
  const std::string_view header_text(reinterpret_cast<const char*>(bytes + 8), header_size);
  MF_CHECK(!header_text.empty() && header_text.front() == '{',
           "{}: header must be a JSON object starting with '{{' (not a safetensors file?)", file);
  const json header = parse_header(file, header_text);

  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      result.metadata_ = parse_metadata(file, value);
    } else {
      result.tensors_.push_back(parse_entry(file, name, value));
    }
  }
  std::sort(result.tensors_.begin(), result.tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
            });
  result.buffer_ = bytes + 8 + header_size;
  result.buffer_size_ = file_size - 8 - header_size;
  check_layout(file, result.tensors_, result.buffer_size_);
  for (size_t tensor_idx = 0; tensor_idx < result.tensors_.size(); ++tensor_idx) {
    result.index_by_name_.emplace(result.tensors_[tensor_idx].name, tensor_idx);
  }
  return result;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_by_name_.find(name);
  return it == index_by_name_.end() ? nullptr : &tensors_[it->second];
}

std::span<const std::byte> SafetensorsFile::data(const TensorInfo& info) const {
  MF_CHECK(info.begin <= info.end && info.end <= buffer_size_,
           "{}: tensor '{}' data_offsets [{}, {}) are outside this file's data buffer",
           path_.string(), info.name, info.begin, info.end);
  return {buffer_ + info.begin, static_cast<size_t>(info.end - info.begin)};
}

void write_safetensors(const fs::path& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string file = path.string();
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::unordered_set<std::string> names;
  uint64_t offset = 0;
  for (const TensorView& tensor : tensors) {
    MF_CHECK(tensor.name != kMetadataKey, "{}: '{}' is reserved and cannot name a tensor", file,
             kMetadataKey);
    MF_CHECK(names.insert(tensor.name).second, "{}: duplicate tensor name '{}'", file, tensor.name);
    const std::optional<int64_t> numel = checked_numel(tensor.shape);
    MF_CHECK(numel.has_value(), "{}: tensor '{}' has an invalid shape {} (negative or too large)",
             file, tensor.name, shape_string(tensor.shape));
    const std::optional<uint64_t> num_bytes = checked_num_bytes(*numel, tensor.dtype);
    MF_CHECK(num_bytes.has_value() && tensor.data.size() == *num_bytes,
             "{}: tensor '{}' has {} bytes of data but dtype {} with shape {} needs {} bytes", file,
             tensor.name, tensor.data.size(), dtype_name(tensor.dtype), shape_string(tensor.shape),
             num_bytes.value_or(0));
    header[tensor.name] = {{"dtype", dtype_name(tensor.dtype)},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + *num_bytes}}};
    offset += *num_bytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    MF_FAIL("{}: cannot encode the header (tensor names and metadata must be UTF-8): {}", file,
            e.what());
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_size = header_text.size();
  std::array<std::byte, 8> size_field;
  std::memcpy(size_field.data(), &header_size, 8);

  AtomicFileWriter writer(path);
  writer.write(size_field);
  writer.write(std::as_bytes(std::span(header_text)));
  for (const TensorView& tensor : tensors) writer.write(tensor.data);
  writer.commit();
}

}  // namespace moeforge::io
