// The byte-level tokenizer.
#include "data/byte_tokenizer.h"

#include "core/error.h"
#include "data/file_util.h"
#include "io/atomic_file.h"

#include <nlohmann/json.hpp>

namespace moeforge::data {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t byte_idx = 0; byte_idx < text.size(); ++byte_idx) {
    ids[byte_idx] = static_cast<unsigned char>(text[byte_idx]);
  }
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids) const {
  std::string text;
  text.reserve(ids.size());
  for (int32_t id : ids) {
    MF_CHECK(id >= 0 && id < kVocabSize, "byte tokenizer: cannot decode id {} (vocab_size {})", id,
             kVocabSize);
    if (id < 256) text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
  }
  return text;
}

void ByteTokenizer::save(const std::filesystem::path& dir) const {
  nlohmann::ordered_json j = {{"format_version", kTokenizerFormatVersion},
                              {"kind", kind()},
                              {"vocab_size", kVocabSize},
                              {"bos_id", kBosId},
                              {"eos_id", kEosId}};
  io::write_file_atomic(dir / kTokenizerJsonName, j.dump(2) + "\n");
}

}  // namespace moeforge::data
