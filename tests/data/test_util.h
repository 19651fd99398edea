// Helpers for the data tests: a temporary folder removed at the end of the test, file I/O, a
// split's windows in the stream layout, a loss mask for hand-built datasets, and the tokens of
// byte-tokenizer documents and splits.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/token_shard.h"
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

// The loss mask of the stream 0, 1, 2, ...: token t counts as a target unless t % 7 < 3.
inline int32_t mask_value(int64_t token) {
  return token % 7 < 3 ? 0 : 1;
}

// Writes a mask shard (vocab 2, mask_value of each token) beside every train shard of a dataset
// whose train stream is 0, 1, 2, ... and lists them in dataset.json as loss_mask_shards (val:
// none, for no shards).
inline void add_loss_mask(const std::filesystem::path& dir) {
  nlohmann::json dataset = nlohmann::json::parse(read_file(dir / kDatasetJsonName));
  nlohmann::json& train = dataset["splits"]["train"];
  nlohmann::json masks = nlohmann::json::array();
  int64_t next_token = 0;
  for (size_t shard_idx = 0; shard_idx < train["shards"].size(); ++shard_idx) {
    const int64_t num_tokens = train["shards"][shard_idx]["num_tokens"];
    std::vector<int32_t> mask(static_cast<size_t>(num_tokens));
    for (int64_t token_idx = 0; token_idx < num_tokens; ++token_idx) {
      mask[token_idx] = mask_value(next_token + token_idx);
    }
    next_token += num_tokens;
    std::string name = "train-0000" + std::to_string(shard_idx) + ".mask.bin";
    write_token_shard(dir / name, mask, 2);
    masks.push_back({{"file", name}, {"num_tokens", num_tokens}});
  }
  train["loss_mask_shards"] = masks;
  dataset["splits"]["val"]["loss_mask_shards"] = nlohmann::json::array();
  write_file(dir / kDatasetJsonName, dataset.dump());
}

// The tokens of a split of a prepared dataset.
inline std::vector<int32_t> read_split(const std::filesystem::path& dir, const std::string& split) {
  TokenDataset dataset = TokenDataset::open(dir, split);
  std::vector<int32_t> tokens(static_cast<size_t>(dataset.num_tokens()));
  dataset.read(0, dataset.num_tokens(), tokens.data());
  return tokens;
}

// A document as the byte tokenizer encodes it: [BOS] + bytes + [EOS].
inline std::vector<int32_t> byte_document_tokens(const std::string& text) {
  std::vector<int32_t> tokens = {ByteTokenizer::kBosId};
  for (unsigned char byte : text) tokens.push_back(byte);
  tokens.push_back(ByteTokenizer::kEosId);
  return tokens;
}

}  // namespace moeforge::data::testing
