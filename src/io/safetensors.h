// Reading (memory-mapped, fully validated) and writing of single safetensors files:
// u64 little-endian header length N, N bytes of JSON header, then the tensor data buffer.
#pragma once

#include "io/dtype.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace moeforge::io {

// Largest header a reader accepts (the reference implementation's limit).
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // row-major; empty for a 0-d scalar
  uint64_t begin = 0;          // [begin, end) relative to the start of the data buffer
  uint64_t end = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps the file read-only and checks everything a reader must: header length within the file
  // and <= kMaxSafetensorsHeaderBytes, a JSON object header, per tensor dtype/shape/data_offsets
  // of the right types, known dtype, non-negative shape, byte count == numel * dtype size, offsets
  // contiguous from 0 without holes or overlap up to the end of the file, unique names, and an
  // optional "__metadata__" string -> string map. Errors name the file and the tensor.
  static SafetensorsFile open(const std::filesystem::path& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  // In data offset order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  // The tensor's bytes inside the mapping (valid while this object lives; any alignment).
  std::span<const std::byte> data(const TensorInfo& info) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  struct Mapping;
  SafetensorsFile() = default;

  std::filesystem::path path_;
  std::unique_ptr<Mapping> mapping_;
  const std::byte* buffer_ = nullptr;  // start of the data buffer inside the mapping
  uint64_t buffer_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_by_name_;
  std::map<std::string, std::string> metadata_;
};

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;  // numel * dtype_size bytes, little-endian row-major
};

// Writes tensors in the given order, the header padded with spaces to a multiple of 8 bytes (so
// the data buffer starts 8-byte aligned in the file), metadata as "__metadata__" when non-empty.
// Checks byte counts, shapes and unique names; streams the data through AtomicFileWriter.
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata);

}  // namespace moeforge::io
