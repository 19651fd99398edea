// Tests of prepare_dataset: file discovery, determinism, the train/val split rules, shard
// cutting, sentencepiece preparation, completion-only loss masks and the rejections.
#include "data/prepare.h"

#include "core/error.h"
#include "core/rng.h"
#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "data/sentencepiece_tokenizer.h"
#include "data/token_shard.h"
#include "test_util.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

namespace moeforge::data {
namespace {

namespace fs = std::filesystem;
using testing::byte_document_tokens;
using testing::read_file;
using testing::read_split;
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

PrepareOptions corpus_options(const fs::path& input, const fs::path& out_dir) {
  PrepareOptions options;
  options.inputs = {input};
  options.exclude_globs = {"*.dat"};
  options.out_dir = out_dir;
  options.val_fraction = 0.2;
  options.shard_tokens = 1000;
  return options;
}

// Writes two documents (doc<i>.txt) whose hashes both pick train at val_fraction, so the hash rule
// leaves val empty and prepare falls back to stream_tail.
void write_two_train_documents(const fs::path& root, double val_fraction) {
  int num_written = 0;
  for (int candidate = 0; num_written < 2; ++candidate) {
    std::string name = "doc" + std::to_string(candidate) + ".txt";
    std::string text = document_text(candidate);
    if (hash_selects_val(document_split_hash(name, text), val_fraction)) continue;
    write_file(root / name, text);
    ++num_written;
  }
}

// The loss mask of a split: the mask shards dataset.json lists, read as one stream.
std::vector<int32_t> read_split_mask(const fs::path& dir, const std::string& split) {
  const nlohmann::json dataset = nlohmann::json::parse(read_file(dir / "dataset.json"));
  std::vector<int32_t> mask;
  for (const nlohmann::json& entry : dataset["splits"][split]["loss_mask_shards"]) {
    TokenShard shard = TokenShard::open(dir / entry["file"].get<std::string>());
    const size_t begin = mask.size();
    mask.resize(begin + static_cast<size_t>(shard.num_tokens()));
    shard.read(0, shard.num_tokens(), mask.data() + begin);
  }
  return mask;
}

// The loss mask of byte_document_tokens(text) with the completion at byte `offset`: 0 for BOS and
// the prompt, 1 for the completion and EOS.
std::vector<int32_t> byte_document_mask(const std::string& text,
                                        const std::vector<CompletionSpan>& spans) {
  std::vector<int32_t> mask(text.size() + 2, 0);
  for (const CompletionSpan& span : spans) {
    const size_t end = std::min(span.end, text.size());
    for (size_t byte = span.begin; byte < end; ++byte) mask[byte + 1] = 1;
  }
  mask.back() = 1;
  return mask;
}

// Each split's loss_mask_shards has one entry per shard, train-00000.mask.bin, ..., with the
// shard's num_tokens, and each mask shard is a 1-byte shard of vocab 2 of that length.
void expect_mask_shards_match(const fs::path& dir) {
  const nlohmann::json dataset = nlohmann::json::parse(read_file(dir / "dataset.json"));
  for (const std::string split : {"train", "val"}) {
    const nlohmann::json& shards = dataset["splits"][split]["shards"];
    ASSERT_TRUE(dataset["splits"][split].contains("loss_mask_shards")) << split;
    const nlohmann::json& masks = dataset["splits"][split]["loss_mask_shards"];
    ASSERT_TRUE(masks.is_array()) << split;
    ASSERT_EQ(masks.size(), shards.size()) << split;
    for (size_t shard_idx = 0; shard_idx < shards.size(); ++shard_idx) {
      const std::string name = fmt::format("{}-{:05d}.mask.bin", split, shard_idx);
      EXPECT_EQ(masks[shard_idx]["file"], name);
      EXPECT_EQ(masks[shard_idx]["num_tokens"], shards[shard_idx]["num_tokens"]) << name;
      TokenShard mask = TokenShard::open(dir / name);
      EXPECT_EQ(mask.vocab_size(), 2) << name;
      EXPECT_EQ(mask.token_bytes(), 1) << name;
      EXPECT_EQ(mask.num_tokens(), shards[shard_idx]["num_tokens"].get<int64_t>()) << name;
      EXPECT_EQ(fs::file_size(dir / name), kTokenShardHeaderBytes + mask.num_tokens()) << name;
    }
  }
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
  write_two_train_documents(dir / "corpus", 0.1);
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

TEST(PrepareDataset, CompletionSpanMasksThePromptAndKeepsTheTokens) {
  TempDir dir;
  // Each document's text and where its completion starts: in the middle, at 0 (all completion),
  // at the end (only EOS counts), inside a 2-byte UTF-8 character.
  const std::string qa = "Question: what is two plus two? Answer: four\n";
  const std::string utf8 = "na\xc3\xafve caf\xc3\xa9, then more";
  const std::map<std::string, std::pair<std::string, size_t>> corpus = {
      {"a.txt", {qa, qa.find("four")}},
      {"b/all.txt", {"every byte of this one is completion", 0}},
      {"b/none.txt", {"no completion here", 18}},
      {"c.txt", {utf8, 3}},
  };
  for (const auto& [relative_path, document] : corpus) {
    write_file(dir / "corpus" / relative_path, document.first);
  }
  PrepareOptions plain = corpus_options(dir / "corpus", dir / "plain");
  plain.val_fraction = 0.0;
  plain.shard_tokens = 16;  // documents cross shard boundaries
  PrepareOptions masked = plain;
  masked.out_dir = dir / "masked";
  std::set<std::string> asked;
  masked.completion_spans = [&corpus, &asked](const InputDocument& document) {
    asked.insert(document.relative_path);
    return std::vector<CompletionSpan>{{corpus.at(document.relative_path).second}};
  };
  const PrepareSummary plain_summary = prepare_dataset(plain);
  const PrepareSummary summary = prepare_dataset(masked);
  EXPECT_EQ(asked.size(), corpus.size());

  // Byte-level encoding of prompt and completion is the encoding of the whole text.
  ASSERT_GT(summary.train_shards.size(), 3u);
  ASSERT_EQ(summary.train_shards, plain_summary.train_shards);
  EXPECT_EQ(summary.num_train_tokens, plain_summary.num_train_tokens);
  for (const std::string& shard : summary.train_shards) {
    EXPECT_EQ(read_file(dir / "masked" / shard), read_file(dir / "plain" / shard)) << shard;
  }
  EXPECT_TRUE(summary.val_shards.empty());

  expect_mask_shards_match(dir / "masked");
  const std::vector<int32_t> tokens = read_split(dir / "masked", "train");
  const std::vector<int32_t> mask = read_split_mask(dir / "masked", "train");
  ASSERT_EQ(mask.size(), tokens.size());
  size_t pos = 0;
  for (const auto& [relative_path, document] : corpus) {
    const auto& [text, offset] = document;
    const std::vector<int32_t> expected_tokens = byte_document_tokens(text);
    const std::vector<int32_t> expected_mask = byte_document_mask(text, {{offset}});
    ASSERT_LE(pos + expected_mask.size(), mask.size()) << relative_path;
    EXPECT_EQ(std::vector<int32_t>(tokens.begin() + pos, tokens.begin() + pos + text.size() + 2),
              expected_tokens)
        << relative_path;
    EXPECT_EQ(std::vector<int32_t>(mask.begin() + pos, mask.begin() + pos + text.size() + 2),
              expected_mask)
        << relative_path;
    pos += expected_mask.size();
  }
  EXPECT_EQ(pos, mask.size());

  const nlohmann::json dataset = nlohmann::json::parse(read_file(dir / "masked" / "dataset.json"));
  EXPECT_EQ(dataset["splits"]["train"]["num_tokens"], static_cast<int64_t>(tokens.size()));
  EXPECT_EQ(dataset["splits"]["val"]["loss_mask_shards"], nlohmann::json::array());
  EXPECT_EQ(dataset["loss_mask"].get<std::string>().rfind("completion", 0), 0u)
      << dataset["loss_mask"];
  EXPECT_TRUE(TokenDataset::open(dir / "masked", "train").has_loss_mask());
}

TEST(PrepareDataset, StreamTailCutsTheMaskWhereItCutsTheTokens) {
  TempDir dir;
  write_two_train_documents(dir / "corpus", 0.1);
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.val_fraction = 0.1;
  options.shard_tokens = 64;
  // The first document's completion is its second half, the second's its last 3 bytes, so the
  // val tail (in the second document) starts in the prompt and ends in the completion.
  options.completion_spans = [](const InputDocument& document) {
    const size_t size = read_file(document.path).size();
    return std::vector<CompletionSpan>{
        {document.relative_path == "doc0.txt" ? size / 2 : size - 3}};
  };
  const PrepareSummary summary = prepare_dataset(options);
  ASSERT_EQ(summary.val_rule, "stream_tail");

  std::vector<int32_t> stream;
  std::vector<int32_t> stream_mask;
  std::vector<InputDocument> documents = collect_input_documents(options);
  ASSERT_EQ(documents.size(), 2u);
  for (const InputDocument& document : documents) {
    const std::string text = read_file(document.path);
    const std::vector<int32_t> tokens = byte_document_tokens(text);
    const std::vector<int32_t> mask = byte_document_mask(text, options.completion_spans(document));
    stream.insert(stream.end(), tokens.begin(), tokens.end());
    stream_mask.insert(stream_mask.end(), mask.begin(), mask.end());
  }
  const auto num_val = static_cast<int64_t>(std::floor(static_cast<double>(stream.size()) * 0.1));
  const auto second_size = static_cast<int64_t>(read_file(documents[1].path).size()) + 2;
  ASSERT_GT(num_val, 4) << "val must hold prompt and completion tokens";
  ASSERT_LT(num_val, second_size) << "the cut must fall inside the second document";
  EXPECT_EQ(summary.num_val_tokens, num_val);
  ASSERT_GT(summary.train_shards.size(), 1u);

  expect_mask_shards_match(dir / "out");
  const std::vector<int32_t> train = read_split(dir / "out", "train");
  const std::vector<int32_t> val = read_split(dir / "out", "val");
  const std::vector<int32_t> train_mask = read_split_mask(dir / "out", "train");
  const std::vector<int32_t> val_mask = read_split_mask(dir / "out", "val");
  EXPECT_EQ(train, std::vector<int32_t>(stream.begin(), stream.end() - num_val));
  EXPECT_EQ(val, std::vector<int32_t>(stream.end() - num_val, stream.end()));
  EXPECT_EQ(train_mask, std::vector<int32_t>(stream_mask.begin(), stream_mask.end() - num_val));
  EXPECT_EQ(val_mask, std::vector<int32_t>(stream_mask.end() - num_val, stream_mask.end()));
  EXPECT_EQ(std::count(val_mask.begin(), val_mask.end(), 1), 4) << "3 completion bytes and EOS";

  const nlohmann::json dataset = nlohmann::json::parse(read_file(dir / "out" / "dataset.json"));
  EXPECT_EQ(dataset["documents"][1]["split"], "train+val");
  EXPECT_TRUE(TokenDataset::open(dir / "out", "train").has_loss_mask());
  EXPECT_TRUE(TokenDataset::open(dir / "out", "val").has_loss_mask());
}

TEST(PrepareDataset, SeveralCompletionsInADocumentAreMaskedEach) {
  TempDir dir;
  // Two questions and answers in one document, an empty span, and spans that touch.
  const std::string two = "Q1? A: red\nQ2? A: blue";
  const std::string touching = "abcdefgh";
  const std::map<std::string, std::pair<std::string, std::vector<CompletionSpan>>> corpus = {
      {"a.txt", {two, {{two.find("red"), two.find("\n")}, {two.find("blue")}}}},
      {"b.txt", {touching, {{1, 1}, {2, 4}, {4, 5}, {7, 8}}}},
  };
  for (const auto& [relative_path, document] : corpus) {
    write_file(dir / "corpus" / relative_path, document.first);
  }
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.val_fraction = 0.0;
  options.completion_spans = [&corpus](const InputDocument& document) {
    return corpus.at(document.relative_path).second;
  };
  prepare_dataset(options);
  const std::vector<int32_t> tokens = read_split(dir / "out", "train");
  const std::vector<int32_t> mask = read_split_mask(dir / "out", "train");
  std::vector<int32_t> expected_tokens, expected_mask;
  for (const auto& [relative_path, document] : corpus) {
    const std::vector<int32_t> document_tokens = byte_document_tokens(document.first);
    const std::vector<int32_t> document_mask = byte_document_mask(document.first, document.second);
    expected_tokens.insert(expected_tokens.end(), document_tokens.begin(), document_tokens.end());
    expected_mask.insert(expected_mask.end(), document_mask.begin(), document_mask.end());
  }
  EXPECT_EQ(tokens, expected_tokens);
  EXPECT_EQ(mask, expected_mask);
  // "red", "blue" and EOS of the first; bytes 2, 3, 4, 7 and EOS of the second.
  EXPECT_EQ(std::count(mask.begin(), mask.end(), 1), 3 + 4 + 1 + 4 + 1);
}

TEST(PrepareDataset, CompletionsPastTheTextOrOutOfOrderAreClearErrors) {
  const std::vector<std::pair<std::vector<CompletionSpan>, std::string>> cases = {
      {{{11}}, "the completion of 'b/long.txt' starts at byte 11, past its 10 bytes"},
      {{{2, 12}}, "the completion of 'b/long.txt' ends at byte 12, past its 10 bytes"},
      {{{4, 6}, {5, 8}},
       "the completions of 'b/long.txt' overlap or are out of order (bytes [5, 8) after byte 6)"},
      {{{6, 4}},
       "the completions of 'b/long.txt' overlap or are out of order (bytes [6, 4) after byte 0)"},
  };
  for (const auto& [spans, expected] : cases) {
    TempDir dir;
    write_file(dir / "corpus" / "a.txt", "abc");
    write_file(dir / "corpus" / "b" / "long.txt", "0123456789");
    PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
    options.completion_spans = [&spans](const InputDocument& document) {
      // The end of the text is allowed as a start.
      return document.relative_path == "a.txt" ? std::vector<CompletionSpan>{{3}} : spans;
    };
    const std::string message = MF_ERROR_MESSAGE(prepare_dataset(options));
    EXPECT_NE(message.find(expected), std::string::npos) << message;
    EXPECT_FALSE(fs::exists(dir / "out"));
    EXPECT_FALSE(fs::exists(dir / ".out.staging"));
  }
}

TEST(PrepareDataset, WithoutCompletionSpansThereIsNoLossMask) {
  TempDir dir;
  write_corpus(dir / "corpus");
  PrepareOptions options = corpus_options(dir / "corpus", dir / "out");
  options.shard_tokens = 500;
  const PrepareSummary summary = prepare_dataset(options);
  ASSERT_EQ(summary.val_rule, "document_hash");
  for (const fs::path& entry : fs::directory_iterator(dir / "out")) {
    EXPECT_EQ(entry.filename().string().find(".mask"), std::string::npos) << entry;
  }
  const nlohmann::json dataset = nlohmann::json::parse(read_file(dir / "out" / "dataset.json"));
  for (const std::string split : {"train", "val"}) {
    EXPECT_FALSE(dataset["splits"][split].contains("loss_mask_shards")) << split;
    EXPECT_FALSE(TokenDataset::open(dir / "out", split).has_loss_mask()) << split;
  }
  EXPECT_EQ(dataset["loss_mask"].get<std::string>().rfind("none", 0), 0u) << dataset["loss_mask"];
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
