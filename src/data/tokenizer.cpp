// load_tokenizer: reads moeforge_tokenizer.json and builds the tokenizer of its kind.
#include "data/tokenizer.h"

#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/file_util.h"
#include "data/sentencepiece_tokenizer.h"

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

// The ids the json records must agree with the tokenizer they describe.
void check_recorded_ids(const nlohmann::json& j, const Tokenizer& tokenizer, const fs::path& file) {
  struct Recorded {
    const char* field;
    int64_t actual;
  };
  for (const Recorded& recorded :
       {Recorded{"vocab_size", tokenizer.vocab_size()}, Recorded{"bos_id", tokenizer.bos_id()},
        Recorded{"eos_id", tokenizer.eos_id()}}) {
    int64_t value = json_int_field(j, recorded.field, file);
    MF_CHECK(value == recorded.actual, "{}: field '{}' is {} but the {} tokenizer has {}",
             file.string(), recorded.field, value, tokenizer.kind(), recorded.actual);
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const fs::path& dir) {
  MF_CHECK(fs::is_directory(dir), "tokenizer folder '{}' not found", dir.string());
  fs::path file = dir / kTokenizerJsonName;
  nlohmann::json j = read_json_file(file);
  json_format_version(j, kTokenizerFormatVersion, file);
  std::string kind = json_string_field(j, "kind", file);
  std::unique_ptr<Tokenizer> tokenizer;
  if (kind == "byte") {
    tokenizer = std::make_unique<ByteTokenizer>();
  } else if (kind == "sentencepiece") {
    std::string model_name = json_string_field(j, "model_file", file);
    MF_CHECK(fs::path(model_name).filename() == model_name,
             "{}: field 'model_file' ('{}') must be a file name inside the tokenizer folder",
             file.string(), model_name);
    tokenizer = SentencePieceTokenizer::from_model_file(dir / model_name);
  } else {
    MF_FAIL("{}: field 'kind' is '{}'; supported kinds are 'byte' and 'sentencepiece'",
            file.string(), kind);
  }
  check_recorded_ids(j, *tokenizer, file);
  return tokenizer;
}

}  // namespace moeforge::data
