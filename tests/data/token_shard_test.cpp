// Tests of the token shard format: round trips for 2- and 4-byte tokens and the rejections.
#include "data/token_shard.h"

#include "core/error.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <numeric>

namespace moeforge::data {
namespace {

using testing::read_file;
using testing::TempDir;
using testing::write_file;

uint64_t header_field(const std::string& bytes, size_t offset, int num_bytes) {
  uint64_t value = 0;
  for (int byte_idx = 0; byte_idx < num_bytes; ++byte_idx) {
    value |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[offset + byte_idx]))
             << (8 * byte_idx);
  }
  return value;
}

TEST(TokenShard, RoundTripsTwoByteTokens) {
  TempDir dir;
  std::vector<int32_t> tokens(1000);
  for (size_t token_idx = 0; token_idx < tokens.size(); ++token_idx) {
    tokens[token_idx] = static_cast<int32_t>((token_idx * 37) % 258);
  }
  write_token_shard(dir / "s.bin", tokens, 258);

  const std::string bytes = read_file(dir / "s.bin");
  ASSERT_EQ(bytes.size(), 64 + 2 * tokens.size());
  EXPECT_EQ(bytes.substr(0, 8), "MFTOKSHD");
  EXPECT_EQ(header_field(bytes, 8, 4), 1u);
  EXPECT_EQ(header_field(bytes, 12, 4), 2u);
  EXPECT_EQ(header_field(bytes, 16, 8), tokens.size());
  EXPECT_EQ(header_field(bytes, 24, 8), 258u);
  EXPECT_EQ(bytes.substr(32, 32), std::string(32, '\0'));
  EXPECT_EQ(header_field(bytes, 64 + 2 * 7, 2), static_cast<uint64_t>(tokens[7]));

  TokenShard shard = TokenShard::open(dir / "s.bin");
  EXPECT_EQ(shard.num_tokens(), 1000);
  EXPECT_EQ(shard.vocab_size(), 258);
  EXPECT_EQ(shard.token_bytes(), 2);
  std::vector<int32_t> back(tokens.size());
  shard.read(0, shard.num_tokens(), back.data());
  EXPECT_EQ(back, tokens);
  EXPECT_EQ(shard.token(999), tokens[999]);
}

TEST(TokenShard, RoundTripsFourByteTokens) {
  TempDir dir;
  const int64_t vocab_size = 100000;
  std::vector<int32_t> tokens = {0, 1, 65535, 65536, 70000, 99999, 12345};
  write_token_shard(dir / "s.bin", tokens, vocab_size);
  EXPECT_EQ(std::filesystem::file_size(dir / "s.bin"), 64 + 4 * tokens.size());

  TokenShard shard = TokenShard::open(dir / "s.bin");
  EXPECT_EQ(shard.token_bytes(), 4);
  std::vector<int32_t> middle(3);
  shard.read(2, 3, middle.data());
  EXPECT_EQ(middle, (std::vector<int32_t>{65535, 65536, 70000}));

  TokenShard moved = std::move(shard);
  EXPECT_EQ(moved.token(5), 99999);
  EXPECT_EQ(moved.num_tokens(), 7);
}

// Loss masks (vocab 2) take one byte per value.
TEST(TokenShard, RoundTripsOneByteTokens) {
  TempDir dir;
  std::vector<int32_t> mask = {0, 1, 1, 0, 0, 0, 1};
  write_token_shard(dir / "m.bin", mask, 2);
  EXPECT_EQ(std::filesystem::file_size(dir / "m.bin"), 64 + mask.size());
  TokenShard shard = TokenShard::open(dir / "m.bin");
  EXPECT_EQ(shard.token_bytes(), 1);
  EXPECT_EQ(shard.vocab_size(), 2);
  std::vector<int32_t> back(mask.size());
  shard.read(0, shard.num_tokens(), back.data());
  EXPECT_EQ(back, mask);
  EXPECT_THROW(write_token_shard(dir / "bad.bin", std::vector<int32_t>{0, 2}, 2), Error);
}

TEST(TokenShard, TokenBytesFollowTheVocabulary) {
  EXPECT_EQ(token_bytes_for_vocab(2), 1);
  EXPECT_EQ(token_bytes_for_vocab(256), 1);
  EXPECT_EQ(token_bytes_for_vocab(257), 2);
  EXPECT_EQ(token_bytes_for_vocab(258), 2);
  EXPECT_EQ(token_bytes_for_vocab(65536), 2);
  EXPECT_EQ(token_bytes_for_vocab(65537), 4);
}

TEST(TokenShard, EmptyShardIsValid) {
  TempDir dir;
  write_token_shard(dir / "empty.bin", {}, 258);
  TokenShard shard = TokenShard::open(dir / "empty.bin");
  EXPECT_EQ(shard.num_tokens(), 0);
  EXPECT_THROW(shard.token(0), Error);
}

TEST(TokenShard, WriteRejectsTokensOutsideTheVocabulary) {
  TempDir dir;
  std::vector<int32_t> tokens = {1, 2, 258};
  std::string message = MF_ERROR_MESSAGE(write_token_shard(dir / "s.bin", tokens, 258));
  EXPECT_NE(message.find("token 258 at index 2"), std::string::npos) << message;
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "no file or temporary file may remain";
}

TEST(TokenShard, ReadIsBoundsChecked) {
  TempDir dir;
  std::vector<int32_t> tokens(10, 5);
  write_token_shard(dir / "s.bin", tokens, 258);
  TokenShard shard = TokenShard::open(dir / "s.bin");
  std::vector<int32_t> out(11);
  EXPECT_NO_THROW(shard.read(10, 0, out.data()));
  std::string message = MF_ERROR_MESSAGE(shard.read(5, 6, out.data()));
  EXPECT_NE(message.find("range [5, 11) is outside its 10 tokens"), std::string::npos) << message;
  EXPECT_THROW(shard.read(-1, 1, out.data()), Error);
  EXPECT_THROW(shard.token(10), Error);
}

class TokenShardCorruption : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<int32_t> tokens(100);
    std::iota(tokens.begin(), tokens.end(), 0);
    write_token_shard(dir_ / "s.bin", tokens, 258);
    bytes_ = read_file(dir_ / "s.bin");
  }
  std::string open_error() {
    write_file(dir_ / "s.bin", bytes_);
    return MF_ERROR_MESSAGE(TokenShard::open(dir_ / "s.bin"));
  }
  TempDir dir_;
  std::string bytes_;
};

TEST_F(TokenShardCorruption, RejectsBadMagic) {
  bytes_[0] = 'X';
  std::string message = open_error();
  EXPECT_NE(message.find("not a moeforge token shard (bad magic"), std::string::npos) << message;
  EXPECT_NE(message.find("s.bin"), std::string::npos) << message;
}

TEST_F(TokenShardCorruption, RejectsNewerVersionWithHint) {
  bytes_[8] = 2;
  std::string message = open_error();
  EXPECT_NE(message.find("format_version 2"), std::string::npos) << message;
  EXPECT_NE(message.find("written by a newer moeforge"), std::string::npos) << message;
}

TEST_F(TokenShardCorruption, RejectsTruncatedFileNamingSizes) {
  bytes_.pop_back();
  std::string message = open_error();
  EXPECT_NE(message.find("expected 264 bytes"), std::string::npos) << message;
  EXPECT_NE(message.find("has 263 bytes"), std::string::npos) << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;

  bytes_.resize(10);
  message = open_error();
  EXPECT_NE(message.find("smaller than the 64-byte header"), std::string::npos) << message;
}

TEST_F(TokenShardCorruption, RejectsBadTokenBytes) {
  bytes_[12] = 3;
  std::string message = open_error();
  EXPECT_NE(message.find("token_bytes is 3, must be 1, 2 or 4"), std::string::npos) << message;
}

TEST_F(TokenShardCorruption, ReadRejectsTokensOutsideTheVocabulary) {
  bytes_[64 + 2 * 50] = static_cast<char>(0xFF);
  bytes_[64 + 2 * 50 + 1] = static_cast<char>(0xFF);
  write_file(dir_ / "s.bin", bytes_);
  TokenShard shard = TokenShard::open(dir_ / "s.bin");
  EXPECT_EQ(shard.token(49), 49);
  std::string message = MF_ERROR_MESSAGE(shard.token(50));
  EXPECT_NE(message.find("token 65535 at index 50 is >= vocab_size 258"), std::string::npos)
      << message;
}

}  // namespace
}  // namespace moeforge::data
