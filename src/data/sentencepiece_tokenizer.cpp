// SentencePiece tokenizer and trainer (through libsentencepiece / libsentencepiece_train).
#include "data/sentencepiece_tokenizer.h"

#include "core/error.h"
#include "data/file_util.h"
#include "io/atomic_file.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <unordered_map>

namespace moeforge::data {

namespace fs = std::filesystem;

SentencePieceTokenizer::SentencePieceTokenizer()
    : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_model_file(
    const fs::path& model_file) {
  MF_CHECK(fs::exists(model_file), "sentencepiece model '{}' not found", model_file.string());
  return from_serialized_model(read_file_bytes(model_file), model_file.string());
}

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_serialized_model(
    std::string model_bytes, const std::string& origin) {
  std::unique_ptr<SentencePieceTokenizer> tokenizer(new SentencePieceTokenizer());
  sentencepiece::util::Status status = tokenizer->processor_->LoadFromSerializedProto(model_bytes);
  MF_CHECK(status.ok(), "'{}' is not a valid sentencepiece model: {}", origin, status.ToString());
  MF_CHECK(tokenizer->processor_->bos_id() >= 0 && tokenizer->processor_->eos_id() >= 0,
           "sentencepiece model '{}' has no BOS or EOS piece (bos_id {}, eos_id {}); moeforge "
           "needs both (train with bos_id and eos_id >= 0)",
           origin, tokenizer->processor_->bos_id(), tokenizer->processor_->eos_id());
  tokenizer->model_bytes_ = std::move(model_bytes);
  return tokenizer;
}

int64_t SentencePieceTokenizer::vocab_size() const {
  return processor_->GetPieceSize();
}

int32_t SentencePieceTokenizer::bos_id() const {
  return processor_->bos_id();
}

int32_t SentencePieceTokenizer::eos_id() const {
  return processor_->eos_id();
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  sentencepiece::util::Status status = processor_->Encode(text, &ids);
  MF_CHECK(status.ok(), "sentencepiece encode failed: {}", status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string SentencePieceTokenizer::decode(std::span<const int32_t> ids) const {
  int64_t num_pieces = vocab_size();
  for (int32_t id : ids) {
    MF_CHECK(id >= 0 && id < num_pieces,
             "sentencepiece tokenizer: cannot decode id {} (vocab_size {})", id, num_pieces);
  }
  std::string text;
  sentencepiece::util::Status status =
      processor_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  MF_CHECK(status.ok(), "sentencepiece decode failed: {}", status.ToString());
  return text;
}

std::string SentencePieceTokenizer::piece(int32_t id) const {
  MF_CHECK(id >= 0 && id < vocab_size(),
           "sentencepiece tokenizer: no piece with id {} (vocab_size {})", id, vocab_size());
  return processor_->IdToPiece(id);
}

void SentencePieceTokenizer::save(const fs::path& dir) const {
  io::write_file_atomic(dir / kSentencePieceModelName, model_bytes_);
  nlohmann::ordered_json j = {{"format_version", kTokenizerFormatVersion},
                              {"kind", kind()},
                              {"model_file", kSentencePieceModelName},
                              {"vocab_size", vocab_size()},
                              {"bos_id", bos_id()},
                              {"eos_id", eos_id()}};
  io::write_file_atomic(dir / kTokenizerJsonName, j.dump(2) + "\n");
}

namespace {

// Feeds the trainer every line of the files in order, each with its trailing newline.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::vector<fs::path>& files) : files_(files) { advance(); }

  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return status_; }

 private:
  void advance() {
    while (true) {
      if (in_.is_open() && std::getline(in_, line_)) {
        if (!in_.eof()) line_.push_back('\n');
        return;
      }
      if (in_.is_open() && in_.bad()) {
        status_ =
            sentencepiece::util::Status(sentencepiece::util::StatusCode::kDataLoss,
                                        "reading '" + files_[file_idx_ - 1].string() + "' failed");
      }
      if (file_idx_ == files_.size() || !status_.ok()) {
        done_ = true;
        return;
      }
      in_.close();
      in_.clear();
      in_.open(files_[file_idx_], std::ios::binary);
      if (!in_.is_open()) {
        status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kNotFound,
                                              "cannot open '" + files_[file_idx_].string() + "'");
      }
      ++file_idx_;
    }
  }

  const std::vector<fs::path>& files_;
  size_t file_idx_ = 0;
  std::ifstream in_;
  std::string line_;
  bool done_ = false;
  sentencepiece::util::Status status_;
};

}  // namespace

void train_sentencepiece(const std::vector<fs::path>& text_files, const fs::path& model_prefix_out,
                         int vocab_size, const SentencePieceTrainOptions& options) {
  MF_CHECK(!text_files.empty(), "train_sentencepiece: no text files given");
  for (const fs::path& file : text_files) {
    MF_CHECK(fs::is_regular_file(file), "train_sentencepiece: text file '{}' not found",
             file.string());
  }
  MF_CHECK(!model_prefix_out.empty() && model_prefix_out.has_filename(),
           "train_sentencepiece: model_prefix_out '{}' names no file", model_prefix_out.string());
  MF_CHECK(vocab_size > 259,
           "train_sentencepiece: vocab_size {} is too small; it needs room for "
           "unk, BOS, EOS, the 256 byte pieces and the characters of the text",
           vocab_size);
  MF_CHECK(options.character_coverage > 0.0 && options.character_coverage <= 1.0,
           "train_sentencepiece: character_coverage {} must be in (0, 1]",
           options.character_coverage);
  MF_CHECK(options.num_threads >= 1, "train_sentencepiece: num_threads {} must be >= 1",
           options.num_threads);

  const std::unordered_map<std::string, std::string> args = {
      {"vocab_size", std::to_string(vocab_size)},
      {"model_type", "bpe"},
      {"byte_fallback", "true"},
      {"character_coverage", fmt::format("{}", options.character_coverage)},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"num_threads", std::to_string(options.num_threads)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"minloglevel", "2"},
  };
  LineIterator lines(text_files);
  std::string model_bytes;
  sentencepiece::util::Status status =
      sentencepiece::SentencePieceTrainer::Train(args, &lines, &model_bytes);
  MF_CHECK(status.ok(), "training a sentencepiece model (vocab_size {}) on {} file(s) failed: {}",
           vocab_size, text_files.size(), status.ToString());
  fs::path model_file = model_prefix_out;
  model_file += ".model";
  io::write_file_atomic(model_file, model_bytes);
}

}  // namespace moeforge::data
