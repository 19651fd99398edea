// Helpers for the data tests: a temporary folder removed at the end of the test, file I/O, and a
// split's windows in the stream layout.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "data/windows.h"

namespace moeforge::data::testing {

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "moeforge_data_XXXXXX").string();
    char* made = ::mkdtemp(pattern.data());
    if (made == nullptr) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = made;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The message of the moeforge::Error that `statement` throws ("" when it throws none).
#define MF_ERROR_MESSAGE(statement)        \
  [&]() -> std::string {                   \
    try {                                  \
      statement;                           \
    } catch (const ::moeforge::Error& e) { \
      return e.what();                     \
    }                                      \
    return "";                             \
  }()

// The split's windows at fixed strides (data/windows.h, layout "stream").
inline Windows stream_windows(const TokenDataset& dataset, int64_t seq_len) {
  return Windows(dataset, seq_len, WindowLayout::kStream);
}

}  // namespace moeforge::data::testing
