// Tests of prepare_dataset: file discovery, determinism, the train/val split rules, shard
// cutting, sentencepiece preparation and the rejections.
#include "data/prepare.h"

#include "core/error.h"
#include "core/rng.h"
#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "data/sentencepiece_tokenizer.h"
#include "data/token_shard.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>

namespace moeforge::data {
namespace {

namespace fs = std::filesystem;
using testing::read_file;
using testing::TempDir;
using testing::write_file;

std::string document_text(int doc_idx) {
  const char* words[] = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"};
  Rng rng(static_cast<uint64_t>(doc_idx) + 1);
  std::string text = "document " + std::to_string(doc_idx) + ":";
  int num_words = 20 + static_cast<int>(rng.below(60));
  for (int word_idx = 0; word_idx < num_words; ++word_idx) {
    text += ' ';
    text += words[rng.below(std::size(words))];
    text += std::to_string(rng.below(100));
  }
  return text + (doc_idx % 4 == 0 ? " naïve café\n" : "\n");
}

// 40 documents in nested folders, plus files prepare must skip.
void write_corpus(const fs::path& root) {
  for (int doc_idx = 0; doc_idx < 40; ++doc_idx) {
    std::string folder = doc_idx % 3 == 0 ? "a/" : (doc_idx % 3 == 1 ? "b/c/" : "");
    write_file(root / (folder + "doc" + std::to_string(doc_idx) + ".txt"), document_text(doc_idx));
  }
  write_file(root / ".hidden.txt", "hidden file");
  write_file(root / ".git" / "config", "hidden folder");
  write_file(root / "a" / "index.dat", std::string("\x00\x01\x02", 3));
}

std::vector<int32_t> read_split(const fs::path& dir, const std::string& split) {
  TokenDataset dataset = TokenDataset::open(dir, split);
  std::vector<int32_t> tokens(static_cast<size_t>(dataset.num_tokens()));
  dataset.read(0, dataset.num_tokens(), tokens.data());
  return tokens;
}

std::vector<int32_t> byte_document_tokens(const std::string& text) {
  std::vector<int32_t> tokens = {ByteTokenizer::kBosId};
  for (unsigned char byte : text) tokens.push_back(byte);
  tokens.push_back(ByteTokenizer::kEosId);
  return tokens;
}

PrepareOptions corpus_options(const fs::path& input, const fs::path& out_dir) {
  PrepareOptions options;
  options.inputs = {input};
  options.exclude_globs = {"*.dat"};
  options.out_dir = out_dir;
  options.val_fraction = 0.2;
  options.shard_tokens = 1000;
  return options;
}

TEST(PrepareDataset, CollectsDocumentsSortedSkippingHiddenAndExcluded) {
  TempDir dir;
  write_corpus(dir / "corpus");
  std::vector<InputDocument> documents =
      collect_input_documents(corpus_options(dir / "corpus", dir / "out"));
  ASSERT_EQ(documents.size(), 40u);
  for (size_t doc_idx = 1; doc_idx < documents.size(); ++doc_idx) {
    EXPECT_LT(documents[doc_idx - 1].relative_path, documents[doc_idx].relative_path);
  }
  EXPECT_EQ(documents.front().relative_path, "a/doc0.txt");
  for (const InputDocument& document : documents) {
    EXPECT_EQ(document.relative_path.find(".dat"), std::string::npos);
    EXPECT_EQ(document.relative_path.find(".hidden"), std::string::npos);
    EXPECT_EQ(document.relative_path.find(".git"), std::string::npos);
  }

  PrepareOptions only_b = corpus_options(dir / "corpus", dir / "out");
  only_b.include_globs = {"b/*"};
  EXPECT_EQ(collect_input_documents(only_b).size(), 13u);

  PrepareOptions twice = corpus_options(dir / "corpus", dir / "out");
  twice.inputs.push_back(dir / "corpus" / "doc2.txt");
  EXPECT_EQ(collect_input_documents(twice).size(), 40u) << "a file reached twice is taken once";

  write_file(dir / "corpus" / "out" / "train-00000.bin", "an earlier dataset");
  EXPECT_EQ(collect_input_documents(corpus_options(dir / "corpus", dir / "corpus" / "out")).size(),
            40u)
      << "files inside out_dir are skipped";
}

TEST(PrepareDataset, IsDeterministicAndSplitsWithoutLosingTokens) {
  TempDir dir;
  write_corpus(dir / "corpus");
  PrepareSummary first = prepare_dataset(corpus_options(dir / "corpus", dir / "out1"));
  PrepareSummary second = prepare_dataset(corpus_options(dir / "corpus", dir / "out2"));

  EXPECT_EQ(first.val_rule, "document_hash");
  EXPECT_EQ(first.num_documents, 40);
  EXPECT_GT(first.num_val_documents, 0);
  EXPECT_GT(first.num_train_documents, 0);
  EXPECT_EQ(first.num_train_documents + first.num_val_documents, 40);
  ASSERT_GT(first.train_shards.size(), 1u) << "shard_tokens 1000 must cut several train shards";
  ASSERT_EQ(first.train_shards, second.train_shards);
  ASSERT_EQ(first.val_shards, second.val_shards);
  for (const std::string& shard : first.train_shards) {
    EXPECT_EQ(read_file(dir / "out1" / shard), read_file(dir / "out2" / shard)) << shard;
    EXPECT_LE(TokenShard::open(dir / "out1" / shard).num_tokens(), 1000);
  }
  EXPECT_EQ(first.train_shards.front(), "train-00000.bin");
  EXPECT_EQ(first.val_shards.front(), "val-00000.bin");
  EXPECT_EQ(read_file(dir / "out1" / "dataset.json"), read_file(dir / "out2" / "dataset.json"));

  // Every document lands whole, in order, in the split the hash rule picks.
  std::vector<InputDocument> documents =
      collect_input_documents(corpus_options(dir / "corpus", dir / "out1"));
  std::vector<int32_t> train = read_split(dir / "out1", "train");
  std::vector<int32_t> val = read_split(dir / "out1", "val");
  size_t train_pos = 0;
  size_t val_pos = 0;
  int64_t num_total = 0;
  for (const InputDocument& document : documents) {
    const std::string text = read_file(document.path);
    const std::vector<int32_t> expected = byte_document_tokens(text);
    const bool is_val = hash_selects_val(document_split_hash(document.relative_path, text), 0.2);
    std::vector<int32_t>& stream = is_val ? val : train;
    size_t& pos = is_val ? val_pos : train_pos;
    ASSERT_LE(pos + expected.size(), stream.size()) << document.relative_path;
    EXPECT_TRUE(std::equal(expected.begin(), expected.end(), stream.begin() + pos))
        << document.relative_path;
    pos += expected.size();
    num_total += static_cast<int64_t>(expected.size());
  }
  EXPECT_EQ(train_pos, train.size());
  EXPECT_EQ(val_pos, val.size());
  EXPECT_EQ(first.num_train_tokens + first.num_val_tokens, num_total);
  EXPECT_EQ(first.num_train_tokens, static_cast<int64_t>(train.size()));

  nlohmann::json dataset = nlohmann::json::parse(read_file(dir / "out1" / "dataset.json"));
  EXPECT_EQ(dataset["format_version"], 1);
  EXPECT_EQ(dataset["tokenizer"]["kind"], "byte");
  EXPECT_EQ(dataset["vocab_size"], 258);
  EXPECT_EQ(dataset["val_rule"]["kind"], "document_hash");
  EXPECT_EQ(dataset["documents"].size(), 40u);
  EXPECT_EQ(load_tokenizer(dir / "out1")->kind(), "byte");
  for (const fs::path& entry : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(entry.filename().string().find(".staging"), std::string::npos) << entry;
  }
}

TEST(PrepareDataset, FallsBackToStreamTailWhenHashLeavesValEmpty) {
  TempDir dir;
  // Two documents whose hashes both pick train at val_fraction 0.1.
  int num_written = 0;
  for (int candidate = 0; num_written < 2; ++candidate) {
    std::string name = "doc" + std::to_string(candidate) + ".txt";
    std::string text = document_text(candidate);
    if (hash_selects_val(document_split_hash(name, text), 0.1)) continue;
    write_file(dir / "corpus" / name, text);
    ++num_written;
  }
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.val_fraction = 0.1;
  PrepareSummary summary = prepare_dataset(options);
  EXPECT_EQ(summary.val_rule, "stream_tail");

  std::vector<int32_t> stream;
  for (const InputDocument& document : collect_input_documents(options)) {
    std::vector<int32_t> tokens = byte_document_tokens(read_file(document.path));
    stream.insert(stream.end(), tokens.begin(), tokens.end());
  }
  const auto num_val = static_cast<int64_t>(std::floor(static_cast<double>(stream.size()) * 0.1));
  ASSERT_GT(num_val, 0);
  EXPECT_EQ(summary.num_val_tokens, num_val);
  std::vector<int32_t> train = read_split(dir / "out", "train");
  std::vector<int32_t> val = read_split(dir / "out", "val");
  EXPECT_EQ(train, std::vector<int32_t>(stream.begin(), stream.end() - num_val));
  EXPECT_EQ(val, std::vector<int32_t>(stream.end() - num_val, stream.end()));
}

TEST(PrepareDataset, ValFractionZeroPutsEverythingInTrain) {
  TempDir dir;
  write_corpus(dir / "corpus");
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.val_fraction = 0.0;
  PrepareSummary summary = prepare_dataset(options);
  EXPECT_EQ(summary.val_rule, "none");
  EXPECT_EQ(summary.num_val_tokens, 0);
  EXPECT_TRUE(summary.val_shards.empty());
  EXPECT_EQ(TokenDataset::open(dir / "out", "val").num_tokens(), 0);
}

TEST(PrepareDataset, SentencePieceDatasetDecodesBackToTheDocuments) {
  TempDir dir;
  write_corpus(dir / "corpus");
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.tokenizer = "sentencepiece";
  options.sp_vocab_size = 320;
  std::vector<std::string> stages;
  PrepareSummary summary = prepare_dataset(options, [&stages](const PrepareProgress& progress) {
    if (stages.empty() || stages.back() != progress.stage) stages.push_back(progress.stage);
  });
  EXPECT_EQ(stages, (std::vector<std::string>{"scan", "train_tokenizer", "encode", "done"}));
  EXPECT_EQ(summary.tokenizer_kind, "sentencepiece");
  EXPECT_EQ(summary.vocab_size, 320);

  std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(dir / "out");
  ASSERT_EQ(tokenizer->kind(), "sentencepiece");
  std::vector<int32_t> train = read_split(dir / "out", "train");
  std::vector<int32_t> val = read_split(dir / "out", "val");
  std::string decoded_train;
  std::string decoded_val;
  size_t num_train_bos = 0;
  for (int32_t id : train) num_train_bos += id == tokenizer->bos_id() ? 1 : 0;
  EXPECT_EQ(num_train_bos, static_cast<size_t>(summary.num_train_documents));
  std::string expected_train;
  std::string expected_val;
  for (const InputDocument& document : collect_input_documents(options)) {
    const std::string text = read_file(document.path);
    bool is_val = hash_selects_val(document_split_hash(document.relative_path, text), 0.2);
    (is_val ? expected_val : expected_train) += text;
  }
  EXPECT_EQ(tokenizer->decode(train), expected_train);
  EXPECT_EQ(tokenizer->decode(val), expected_val);
  EXPECT_LT(train.size(), expected_train.size()) << "BPE must compress the text";
}

TEST(PrepareDataset, Rejections) {
  TempDir dir;
  write_corpus(dir / "corpus");
  write_file(dir / "empty" / ".only_hidden", "x");

  PrepareOptions options = corpus_options(dir / "empty", dir / "out");
  std::string message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("no input files found"), std::string::npos) << message;
  EXPECT_NE(message.find((dir / "empty").string()), std::string::npos) << message;

  options = corpus_options(dir / "missing", dir / "out");
  message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("missing' not found"), std::string::npos) << message;

  options = corpus_options(dir / "corpus", "");
  message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("out_dir is empty"), std::string::npos) << message;

  options = corpus_options(dir / "corpus", dir / "out");
  options.val_fraction = 0.6;
  message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("val_fraction 0.6 must be in [0, 0.5]"), std::string::npos) << message;

  options = corpus_options(dir / "corpus", dir / "out");
  options.tokenizer = "wordpiece";
  message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("tokenizer 'wordpiece' is unknown"), std::string::npos) << message;

  write_file(dir / "out" / "keep.txt", "precious");
  options = corpus_options(dir / "corpus", dir / "out");
  message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("exists and is not empty"), std::string::npos) << message;
  EXPECT_EQ(read_file(dir / "out" / "keep.txt"), "precious");

  options.overwrite = true;
  prepare_dataset(options);
  EXPECT_FALSE(fs::exists(dir / "out" / "keep.txt"));
  EXPECT_TRUE(fs::exists(dir / "out" / "dataset.json"));
}

TEST(PrepareDataset, FailureLeavesNoStagingAndNoOutput) {
  TempDir dir;
  write_corpus(dir / "corpus");
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.tokenizer = "sentencepiece";
  options.sp_vocab_size = 60000;  // more pieces than this small corpus supports
  std::string message = MF_ERROR_MESSAGE(prepare_dataset(options));
  EXPECT_NE(message.find("Vocabulary size too high"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(dir / "out"));
  EXPECT_FALSE(fs::exists(dir / ".out.staging"));
}

TEST(PrepareDataset, SplitHashIsFnv1a) {
  // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; a zero byte then "" extends it.
  uint64_t expected = 0xaf63dc4c8601ec8cull;
  expected = (expected ^ 0) * 0x100000001b3ull;
  EXPECT_EQ(document_split_hash("a", ""), expected);
  EXPECT_NE(document_split_hash("a", "x"), document_split_hash("b", "x"));
  EXPECT_TRUE(hash_selects_val(4999, 0.5));
  EXPECT_FALSE(hash_selects_val(5000, 0.5));
  EXPECT_FALSE(hash_selects_val(0, 0.0));
  EXPECT_TRUE(hash_selects_val(10000 + 499, 0.05));
  EXPECT_FALSE(hash_selects_val(10000 + 500, 0.05));
}

}  // namespace
}  // namespace moeforge::data
