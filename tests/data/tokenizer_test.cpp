// Tests of the byte tokenizer and of load_tokenizer's checks of moeforge_tokenizer.json.
#include "data/tokenizer.h"
#include "data/byte_tokenizer.h"

#include "core/error.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace moeforge::data {
namespace {

using testing::read_file;
using testing::TempDir;
using testing::write_file;

TEST(ByteTokenizer, EncodesBytesAndRoundTripsUtf8) {
  ByteTokenizer tokenizer;
  const std::string text = "Grüße, 日本語 😀\n\tend";
  std::vector<int32_t> ids = tokenizer.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  // "ü" is C3 BC in UTF-8.
  EXPECT_EQ(ids[2], 0xC3);
  EXPECT_EQ(ids[3], 0xBC);
  EXPECT_EQ(tokenizer.decode(ids), text);
}

TEST(ByteTokenizer, RoundTripsEveryByteIncludingInvalidUtf8) {
  ByteTokenizer tokenizer;
  std::string bytes;
  for (int value = 0; value < 256; ++value) bytes.push_back(static_cast<char>(value));
  std::vector<int32_t> ids = tokenizer.encode(bytes);
  for (int value = 0; value < 256; ++value) EXPECT_EQ(ids[value], value);
  EXPECT_EQ(tokenizer.decode(ids), bytes);
}

TEST(ByteTokenizer, SpecialIdsDecodeToNothingAndBadIdsThrow) {
  ByteTokenizer tokenizer;
  EXPECT_EQ(tokenizer.vocab_size(), 258);
  EXPECT_EQ(tokenizer.bos_id(), 256);
  EXPECT_EQ(tokenizer.eos_id(), 257);
  std::vector<int32_t> ids = {256, 'h', 'i', 257};
  EXPECT_EQ(tokenizer.decode(ids), "hi");
  std::vector<int32_t> bad = {'a', 258};
  EXPECT_NE(MF_ERROR_MESSAGE(tokenizer.decode(bad)).find("cannot decode id 258"),
            std::string::npos);
  std::vector<int32_t> negative = {-1};
  EXPECT_THROW(tokenizer.decode(negative), Error);
}

TEST(LoadTokenizer, LoadsSavedByteTokenizer) {
  TempDir dir;
  ByteTokenizer().save(dir.path());
  nlohmann::json j = nlohmann::json::parse(read_file(dir / kTokenizerJsonName));
  EXPECT_EQ(j["format_version"], 1);
  EXPECT_EQ(j["kind"], "byte");
  std::unique_ptr<Tokenizer> loaded = load_tokenizer(dir.path());
  EXPECT_EQ(loaded->kind(), "byte");
  EXPECT_EQ(loaded->vocab_size(), 258);
  EXPECT_EQ(loaded->decode(loaded->encode("abc")), "abc");
}

TEST(LoadTokenizer, ErrorsNameTheFileAndField) {
  TempDir dir;
  const std::string json_path = (dir / kTokenizerJsonName).string();

  EXPECT_NE(MF_ERROR_MESSAGE(load_tokenizer(dir.path())).find(json_path), std::string::npos);

  write_file(dir / kTokenizerJsonName, R"({"format_version": 2, "kind": "byte"})");
  std::string message = MF_ERROR_MESSAGE(load_tokenizer(dir.path()));
  EXPECT_NE(message.find(json_path), std::string::npos) << message;
  EXPECT_NE(message.find("newer moeforge"), std::string::npos) << message;

  write_file(dir / kTokenizerJsonName, R"({"format_version": 1})");
  message = MF_ERROR_MESSAGE(load_tokenizer(dir.path()));
  EXPECT_NE(message.find("missing field 'kind'"), std::string::npos) << message;

  write_file(dir / kTokenizerJsonName, R"({"format_version": 1, "kind": "wordpiece"})");
  message = MF_ERROR_MESSAGE(load_tokenizer(dir.path()));
  EXPECT_NE(message.find("'wordpiece'"), std::string::npos) << message;

  write_file(dir / kTokenizerJsonName,
             R"({"format_version": 1, "kind": "byte", "vocab_size": 300, "bos_id": 256,
                 "eos_id": 257})");
  message = MF_ERROR_MESSAGE(load_tokenizer(dir.path()));
  EXPECT_NE(message.find("field 'vocab_size' is 300"), std::string::npos) << message;

  write_file(dir / kTokenizerJsonName, R"({"format_version": 1, "kind": "sentencepiece",
                                           "model_file": "tokenizer.model"})");
  message = MF_ERROR_MESSAGE(load_tokenizer(dir.path()));
  EXPECT_NE(message.find("tokenizer.model' not found"), std::string::npos) << message;

  write_file(dir / kTokenizerJsonName, "{not json");
  message = MF_ERROR_MESSAGE(load_tokenizer(dir.path()));
  EXPECT_NE(message.find("not valid JSON"), std::string::npos) << message;
}

}  // namespace
}  // namespace moeforge::data
