// The byte-level tokenizer: ids 0..255 are the bytes of the text, 256 is BOS and 257 is EOS.
// Lossless for any byte string (decode returns raw bytes, which may be invalid UTF-8).
#pragma once

#include "data/tokenizer.h"

namespace moeforge::data {

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kBosId = 256;
  static constexpr int32_t kEosId = 257;
  static constexpr int64_t kVocabSize = 258;

  int64_t vocab_size() const override { return kVocabSize; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int32_t bos_id() const override { return kBosId; }
  int32_t eos_id() const override { return kEosId; }
  std::string kind() const override { return "byte"; }
  // Writes dir/moeforge_tokenizer.json: {"format_version", "kind", "vocab_size", "bos_id",
  // "eos_id"}.
  void save(const std::filesystem::path& dir) const override;
};

}  // namespace moeforge::data
