// Token shards: the versioned binary files that hold a tokenized dataset.
// Layout (little-endian): a 64-byte header
//   [0, 8)   magic "MFTOKSHD"
//   [8, 12)  u32 format_version (1)
//   [12, 16) u32 token_bytes (1 when vocab_size <= 256, 2 when <= 65536, else 4)
//   [16, 24) u64 num_tokens
//   [24, 32) u64 vocab_size
//   [32, 64) zero
// followed by num_tokens unsigned tokens of token_bytes each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

namespace moeforge::data {

inline constexpr uint32_t kTokenShardFormatVersion = 1;
inline constexpr size_t kTokenShardHeaderBytes = 64;

// 1 when every id of the vocabulary fits in a byte (loss masks), 2 in a u16, else 4.
int token_bytes_for_vocab(int64_t vocab_size);

// Writes the shard atomically (temporary file in the same folder, fsync, rename). Every token
// must lie in [0, vocab_size); the error names the first one that does not.
void write_token_shard(const std::filesystem::path& path, std::span<const int32_t> tokens,
                       int64_t vocab_size);

// A shard mapped read-only. open() validates the header and the file size; token values are
// checked against vocab_size as they are read (not on open, which would read the whole file).
class TokenShard {
 public:
  static TokenShard open(const std::filesystem::path& path);

  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  ~TokenShard();

  int64_t num_tokens() const { return num_tokens_; }
  int64_t vocab_size() const { return vocab_size_; }
  int token_bytes() const { return token_bytes_; }
  const std::filesystem::path& path() const { return path_; }

  int32_t token(int64_t token_idx) const;
  // out[0:count] = tokens [begin, begin + count); the range must lie inside the shard.
  void read(int64_t begin, int64_t count, int32_t* out) const;

 private:
  TokenShard() = default;
  void release();

  std::filesystem::path path_;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  const unsigned char* tokens_ = nullptr;  // [num_tokens * token_bytes]
  int64_t num_tokens_ = 0;
  int64_t vocab_size_ = 0;
  int token_bytes_ = 0;
};

}  // namespace moeforge::data
