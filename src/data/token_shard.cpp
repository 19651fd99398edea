// Writing (atomic) and memory-mapped reading of token shards.
#include "data/token_shard.h"

#include "core/error.h"
#include "data/file_util.h"
#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'M', 'F', 'T', 'O', 'K', 'S', 'H', 'D'};
constexpr int64_t kWriteChunkTokens = 1 << 20;

void store_le(unsigned char* dst, uint64_t value, int num_bytes) {
  for (int byte_idx = 0; byte_idx < num_bytes; ++byte_idx) {
    dst[byte_idx] = static_cast<unsigned char>(value >> (8 * byte_idx));
  }
}

uint64_t load_le(const unsigned char* src, int num_bytes) {
  uint64_t value = 0;
  for (int byte_idx = 0; byte_idx < num_bytes; ++byte_idx) {
    value |= static_cast<uint64_t>(src[byte_idx]) << (8 * byte_idx);
  }
  return value;
}

}  // namespace

int token_bytes_for_vocab(int64_t vocab_size) {
  return vocab_size <= 256 ? 1 : vocab_size <= 65536 ? 2 : 4;
}

void write_token_shard(const fs::path& path, std::span<const int32_t> tokens, int64_t vocab_size) {
  MF_CHECK(vocab_size >= 1 && vocab_size <= std::numeric_limits<int32_t>::max(),
           "token shard '{}': vocab_size {} must be in [1, 2^31)", path.string(), vocab_size);
  const int token_bytes = token_bytes_for_vocab(vocab_size);
  for (size_t token_idx = 0; token_idx < tokens.size(); ++token_idx) {
    MF_CHECK(tokens[token_idx] >= 0 && tokens[token_idx] < vocab_size,
             "token shard '{}': token {} at index {} is outside [0, vocab_size {})", path.string(),
             tokens[token_idx], token_idx, vocab_size);
  }

  std::array<unsigned char, kTokenShardHeaderBytes> header{};
  std::memcpy(header.data(), kMagic, sizeof(kMagic));
  store_le(header.data() + 8, kTokenShardFormatVersion, 4);
  store_le(header.data() + 12, static_cast<uint64_t>(token_bytes), 4);
  store_le(header.data() + 16, tokens.size(), 8);
  store_le(header.data() + 24, static_cast<uint64_t>(vocab_size), 8);

  io::AtomicFileWriter writer(path);
  writer.write(std::as_bytes(std::span(header.data(), header.size())));
  std::vector<unsigned char> chunk;
  for (size_t begin = 0; begin < tokens.size(); begin += kWriteChunkTokens) {
    size_t count = std::min<size_t>(kWriteChunkTokens, tokens.size() - begin);
    chunk.resize(count * token_bytes);
    for (size_t token_idx = 0; token_idx < count; ++token_idx) {
      store_le(chunk.data() + token_idx * token_bytes,
               static_cast<uint32_t>(tokens[begin + token_idx]), token_bytes);
    }
    writer.write(std::as_bytes(std::span(chunk.data(), chunk.size())));
  }
  writer.commit();
}

TokenShard TokenShard::open(const fs::path& path) {
  TokenShard shard;
  shard.path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MF_CHECK(fd >= 0, "cannot open token shard '{}': {}", path.string(), std::strerror(errno));
  struct stat file_stat {};
  if (::fstat(fd, &file_stat) != 0) {
    std::string reason = std::strerror(errno);
    ::close(fd);
    MF_FAIL("cannot stat token shard '{}': {}", path.string(), reason);
  }
  const uint64_t file_bytes = static_cast<uint64_t>(file_stat.st_size);
  if (file_bytes < kTokenShardHeaderBytes) {
    ::close(fd);
    MF_FAIL("token shard '{}' is truncated: {} bytes, smaller than the {}-byte header",
            path.string(), file_bytes, kTokenShardHeaderBytes);
  }
  void* mapping = ::mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, fd, 0);
  int mmap_errno = errno;
  ::close(fd);
  MF_CHECK(mapping != MAP_FAILED, "cannot map token shard '{}': {}", path.string(),
           std::strerror(mmap_errno));
  shard.mapping_ = mapping;
  shard.mapping_bytes_ = file_bytes;

  const auto* header = static_cast<const unsigned char*>(mapping);
  MF_CHECK(std::memcmp(header, kMagic, sizeof(kMagic)) == 0,
           "'{}' is not a moeforge token shard (bad magic; expected \"MFTOKSHD\")", path.string());
  const uint64_t version = load_le(header + 8, 4);
  MF_CHECK(version <= kTokenShardFormatVersion,
           "token shard '{}' has format_version {}, newer than the supported {}; it was written by "
           "a newer moeforge, upgrade to read it",
           path.string(), version, kTokenShardFormatVersion);
  MF_CHECK(version >= 1, "token shard '{}' has invalid format_version {}", path.string(), version);
  const uint64_t token_bytes = load_le(header + 12, 4);
  MF_CHECK(token_bytes == 1 || token_bytes == 2 || token_bytes == 4,
           "token shard '{}': token_bytes is {}, must be 1, 2 or 4", path.string(), token_bytes);
  const uint64_t num_tokens = load_le(header + 16, 8);
  const uint64_t vocab_size = load_le(header + 24, 8);
  MF_CHECK(vocab_size >= 1 && vocab_size <= std::numeric_limits<int32_t>::max(),
           "token shard '{}': vocab_size {} must be in [1, 2^31)", path.string(), vocab_size);
  MF_CHECK(
      num_tokens <= (std::numeric_limits<uint64_t>::max() - kTokenShardHeaderBytes) / token_bytes,
      "token shard '{}': num_tokens {} is impossibly large (corrupt header)", path.string(),
      num_tokens);
  const uint64_t expected_bytes = kTokenShardHeaderBytes + num_tokens * token_bytes;
  MF_CHECK(file_bytes == expected_bytes,
           "token shard '{}' has the wrong size: expected {} bytes (64-byte header + {} tokens x "
           "{} bytes) but the file has {} bytes{}",
           path.string(), expected_bytes, num_tokens, token_bytes, file_bytes,
           file_bytes < expected_bytes ? " (truncated: was the write interrupted?)" : "");
  shard.tokens_ = header + kTokenShardHeaderBytes;
  shard.num_tokens_ = static_cast<int64_t>(num_tokens);
  shard.vocab_size_ = static_cast<int64_t>(vocab_size);
  shard.token_bytes_ = static_cast<int>(token_bytes);
  return shard;
}

TokenShard::TokenShard(TokenShard&& other) noexcept {
  *this = std::move(other);
}

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_bytes_ = std::exchange(other.mapping_bytes_, 0);
    tokens_ = std::exchange(other.tokens_, nullptr);
    num_tokens_ = std::exchange(other.num_tokens_, 0);
    vocab_size_ = std::exchange(other.vocab_size_, 0);
    token_bytes_ = std::exchange(other.token_bytes_, 0);
  }
  return *this;
}

TokenShard::~TokenShard() {
  release();
}

void TokenShard::release() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_bytes_);
  mapping_ = nullptr;
}

int32_t TokenShard::token(int64_t token_idx) const {
  int32_t value = 0;
  read(token_idx, 1, &value);
  return value;
}

void TokenShard::read(int64_t begin, int64_t count, int32_t* out) const {
  MF_CHECK(begin >= 0 && count >= 0 && begin <= num_tokens_ && count <= num_tokens_ - begin,
           "token shard '{}': range [{}, {}) is outside its {} tokens", path_.string(), begin,
           begin + count, num_tokens_);
  const unsigned char* src = tokens_ + begin * token_bytes_;
  for (int64_t token_idx = 0; token_idx < count; ++token_idx) {
    uint64_t value = load_le(src + token_idx * token_bytes_, token_bytes_);
    MF_CHECK(value < static_cast<uint64_t>(vocab_size_),
             "token shard '{}' is corrupt: token {} at index {} is >= vocab_size {}",
             path_.string(), value, begin + token_idx, vocab_size_);
    out[token_idx] = static_cast<int32_t>(value);
  }
}

}  // namespace moeforge::data
