// Tests of SentencePiece training (deterministic, byte fallback) and of the tokenizer wrapper.
#include "data/sentencepiece_tokenizer.h"

#include "core/error.h"
#include "core/rng.h"
#include "test_util.h"

#include <gtest/gtest.h>

namespace moeforge::data {
namespace {

using testing::read_file;
using testing::TempDir;
using testing::write_file;

constexpr int kVocabSize = 320;

// A few KB of sentences from a small word list (deterministic).
std::string generated_text() {
  const char* words[] = {"the",   "quick", "brown",  "fox",   "jumps", "over",  "lazy", "dog",
                         "and",   "then",  "sleeps", "under", "a",     "warm",  "sun",  "while",
                         "birds", "sing",  "in",     "trees", "near",  "river", "bank", "today"};
  Rng rng(7);
  std::string text;
  for (int sentence_idx = 0; sentence_idx < 200; ++sentence_idx) {
    int num_words = 4 + static_cast<int>(rng.below(8));
    for (int word_idx = 0; word_idx < num_words; ++word_idx) {
      if (word_idx > 0) text += ' ';
      text += words[rng.below(std::size(words))];
    }
    text += sentence_idx % 3 == 0 ? ".\n\n" : ". ";
  }
  return text;
}

class SentencePieceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    write_file(*dir_ / "corpus.txt", generated_text());
    train_sentencepiece({*dir_ / "corpus.txt"}, *dir_ / "m", kVocabSize);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static TempDir* dir_;
};

TempDir* SentencePieceTest::dir_ = nullptr;

TEST_F(SentencePieceTest, TrainedModelHasRequestedVocabAndSpecialIds) {
  auto tokenizer = SentencePieceTokenizer::from_model_file(*dir_ / "m.model");
  EXPECT_EQ(tokenizer->vocab_size(), kVocabSize);
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_EQ(tokenizer->kind(), "sentencepiece");
  EXPECT_EQ(tokenizer->piece(3), "<0x00>");
}

TEST_F(SentencePieceTest, RoundTripIsLosslessAndCompresses) {
  auto tokenizer = SentencePieceTokenizer::from_model_file(*dir_ / "m.model");
  const std::string seen = "the quick brown fox jumps over the lazy dog.\n\n";
  std::vector<int32_t> seen_ids = tokenizer->encode(seen);
  EXPECT_LT(seen_ids.size() * 4, seen.size() * 3) << seen_ids.size();
  EXPECT_EQ(tokenizer->decode(seen_ids), seen);
  for (const std::string& text :
       {std::string("  leading and   inner spaces, trailing  "), std::string("tab\there\n"),
        std::string("Grüße, 日本語 😀 unseen characters"), std::string("ZZZ 12345 ~!@#")}) {
    std::vector<int32_t> ids = tokenizer->encode(text);
    for (int32_t id : ids) EXPECT_NE(id, 0) << "unknown piece in '" << text << "'";
    EXPECT_EQ(tokenizer->decode(ids), text);
  }
  std::vector<int32_t> with_specials = tokenizer->encode("sun");
  with_specials.insert(with_specials.begin(), tokenizer->bos_id());
  with_specials.push_back(tokenizer->eos_id());
  EXPECT_EQ(tokenizer->decode(with_specials), "sun");
  std::vector<int32_t> bad = {kVocabSize};
  EXPECT_NE(MF_ERROR_MESSAGE(tokenizer->decode(bad)).find("cannot decode id 320"),
            std::string::npos);
}

TEST_F(SentencePieceTest, SaveAndLoadTokenizerGiveTheSameIds) {
  auto tokenizer = SentencePieceTokenizer::from_model_file(*dir_ / "m.model");
  TempDir saved;
  tokenizer->save(saved.path());
  EXPECT_EQ(read_file(saved / kSentencePieceModelName), read_file(*dir_ / "m.model"));
  std::unique_ptr<Tokenizer> loaded = load_tokenizer(saved.path());
  EXPECT_EQ(loaded->kind(), "sentencepiece");
  EXPECT_EQ(loaded->vocab_size(), kVocabSize);
  const std::string text = generated_text().substr(0, 500);
  EXPECT_EQ(loaded->encode(text), tokenizer->encode(text));
}

TEST_F(SentencePieceTest, TrainingIsDeterministic) {
  TempDir again;
  train_sentencepiece({*dir_ / "corpus.txt"}, again / "m", kVocabSize);
  EXPECT_EQ(read_file(again / "m.model"), read_file(*dir_ / "m.model"));
}

TEST_F(SentencePieceTest, TrainingErrorsAreActionable) {
  TempDir out;
  std::string message =
      MF_ERROR_MESSAGE(train_sentencepiece({*dir_ / "corpus.txt"}, out / "m", 50000));
  EXPECT_NE(message.find("vocab_size 50000"), std::string::npos) << message;
  EXPECT_NE(message.find("Vocabulary size too high"), std::string::npos) << message;
  EXPECT_FALSE(std::filesystem::exists(out / "m.model"));

  message = MF_ERROR_MESSAGE(train_sentencepiece({*dir_ / "missing.txt"}, out / "m", kVocabSize));
  EXPECT_NE(message.find("missing.txt' not found"), std::string::npos) << message;

  message = MF_ERROR_MESSAGE(train_sentencepiece({*dir_ / "corpus.txt"}, out / "m", 100));
  EXPECT_NE(message.find("vocab_size 100 is too small"), std::string::npos) << message;
}

TEST(SentencePieceTokenizer, RejectsFilesThatAreNotModels) {
  TempDir dir;
  write_file(dir / "bad.model", "not a model");
  std::string message =
      MF_ERROR_MESSAGE(SentencePieceTokenizer::from_model_file(dir / "bad.model"));
  EXPECT_NE(message.find("bad.model' is not a valid sentencepiece model"), std::string::npos)
      << message;
}

}  // namespace
}  // namespace moeforge::data
