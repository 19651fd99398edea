// A SentencePiece model behind the Tokenizer interface, and training of such a model (BPE with
// byte fallback, so every UTF-8 text encodes without unknown pieces).
#pragma once

#include "data/tokenizer.h"

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moeforge::data {

inline constexpr const char* kSentencePieceModelName = "tokenizer.model";

// Ids come from the model; train_sentencepiece puts unk at 0, BOS at 1 and EOS at 2. Round trips
// are lossless for valid UTF-8 (the model does no normalization); invalid UTF-8 bytes decode as
// U+FFFD.
class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads a serialized SentencePiece model (a .model file); the model must define BOS and EOS.
  static std::unique_ptr<SentencePieceTokenizer> from_model_file(
      const std::filesystem::path& model_file);
  static std::unique_ptr<SentencePieceTokenizer> from_serialized_model(std::string model_bytes,
                                                                       const std::string& origin);
  ~SentencePieceTokenizer() override;

  int64_t vocab_size() const override;
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  std::string kind() const override { return "sentencepiece"; }
  // Writes dir/tokenizer.model and dir/moeforge_tokenizer.json ({"format_version", "kind",
  // "model_file", "vocab_size", "bos_id", "eos_id"}).
  void save(const std::filesystem::path& dir) const override;

  // The text of one piece ("▁the", "<0x0A>", "<s>"), for inspection.
  std::string piece(int32_t id) const;

 private:
  SentencePieceTokenizer();

  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::string model_bytes_;  // the serialized model, written back by save()
};

struct SentencePieceTrainOptions {
  // Fraction of characters covered by pieces; the rest fall back to bytes.
  double character_coverage = 0.9995;
  // SentencePiece's threads; 1 keeps training reproducible across machines.
  int num_threads = 1;
};

// Trains a BPE model on the lines of `text_files` (each line with its newline, so newlines get
// pieces too) and writes `<model_prefix_out>.model`. Deterministic: every line is used, in file
// order, without shuffling. Pieces: unk = 0, BOS = 1, EOS = 2, 256 byte pieces, then merges.
// Throws with SentencePiece's message when vocab_size does not fit the data (too small for the
// byte pieces and characters, or larger than the merges the text supports).
void train_sentencepiece(const std::vector<std::filesystem::path>& text_files,
                         const std::filesystem::path& model_prefix_out, int vocab_size,
                         const SentencePieceTrainOptions& options = {});

}  // namespace moeforge::data
