// The tokenizer interface (text <-> token ids) and load_tokenizer, which reads a tokenizer saved
// in a folder: dir/moeforge_tokenizer.json ({"format_version": 1, "kind": "byte" or
// "sentencepiece", ...}) plus, for sentencepiece, dir/tokenizer.model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge::data {

inline constexpr int64_t kTokenizerFormatVersion = 1;
inline constexpr const char* kTokenizerJsonName = "moeforge_tokenizer.json";

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  virtual int64_t vocab_size() const = 0;
  // The ids of `text`, without BOS/EOS (callers add them around documents).
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Special ids (BOS, EOS, unknown) produce no text; an id outside [0, vocab_size) throws.
  virtual std::string decode(std::span<const int32_t> ids) const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  // "byte" or "sentencepiece": the "kind" field of moeforge_tokenizer.json.
  virtual std::string kind() const = 0;
  // Writes dir/moeforge_tokenizer.json and the files of the kind (atomically; dir must exist).
  virtual void save(const std::filesystem::path& dir) const = 0;
};

// Reads a folder written by Tokenizer::save. Errors name the file and the field.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& dir);

}  // namespace moeforge::data
