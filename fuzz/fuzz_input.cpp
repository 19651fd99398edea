// Scratch folder, input splitting and file writing for the fuzz targets (see fuzz_input.h).
#include "fuzz_input.h"

#include "core/error.h"

#include <unistd.h>

#include <cstdio>

#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

namespace moeforge::fuzz {

namespace fs = std::filesystem;

namespace {

struct ScratchDir {
  fs::path path;
  ScratchDir() {
    const char* tmp = std::getenv("TMPDIR");
    fs::path base = tmp != nullptr && *tmp != '\0' ? fs::path(tmp) : fs::path("/tmp");
    if (tmp == nullptr && fs::is_directory("/dev/shm")) base = "/dev/shm";
    path = base / ("moeforge-fuzz-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

}  // namespace

const fs::path& scratch_dir() {
  static const ScratchDir dir;
  return dir.path;
}

std::vector<std::string_view> split_files(const uint8_t* data, size_t size, size_t num_files) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < num_files) {
    const size_t separator_pos = rest.find(kFileSeparator);
    if (separator_pos == std::string_view::npos) break;
    parts.push_back(rest.substr(0, separator_pos));
    rest.remove_prefix(separator_pos + kFileSeparator.size());
  }
  parts.push_back(rest);
  parts.resize(num_files);
  return parts;
}

void write_bytes(const fs::path& path, std::string_view bytes, bool remove_if_empty) {
  if (remove_if_empty && bytes.empty()) {
    fs::remove(path);
    return;
  }
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error("fuzz harness: cannot write " + path.string());
}

void rejected(const Error& error) {
  static const bool verbose = std::getenv("MOEFORGE_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "rejected: %s\n", error.what());
}

}  // namespace moeforge::fuzz
