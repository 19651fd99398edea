// Tests of the safetensors writer and reader: bit-exact round trips, header padding, metadata,
// and the rejection (with a message naming the problem) of hand-built malformed files.
#include "io/safetensors.h"

#include "io/io_test_util.h"

#include <gtest/gtest.h>

#include <cstring>
#include <optional>
#include <random>

namespace moeforge::io {
namespace {

using testing::expect_error;
using testing::list_dir;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

std::vector<std::byte> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<std::byte> bytes(n);
  for (std::byte& b : bytes) b = static_cast<std::byte>(gen() & 0xFF);
  return bytes;
}

std::string u64_le(uint64_t value) {
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &value, 8);
  return bytes;
}

// A file made of the 8-byte length (declared_size, or the header's size), the header text and
// num_data_bytes bytes of data.
void write_raw(const std::filesystem::path& path, const std::string& header, size_t num_data_bytes,
               std::optional<uint64_t> declared_size = std::nullopt) {
  write_bytes(path, u64_le(declared_size.value_or(header.size())) + header +
                        std::string(num_data_bytes, '\x11'));
}

struct OwnedTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;
};

std::vector<OwnedTensor> sample_tensors() {
  std::vector<OwnedTensor> tensors = {
      {"model.embed.weight", DType::kF32, {2, 3}, {}},
      {"layers.0.attn.q.weight", DType::kBF16, {4}, {}},
      {"layers.0.norm", DType::kF16, {1, 3, 1}, {}},
      {"scale", DType::kF64, {}, {}},  // 0-d scalar
      {"token_ids", DType::kI64, {3}, {}},
      {"empty", DType::kF32, {0, 5}, {}},
      {"mask", DType::kBool, {3}, {}},
      {"codes", DType::kU8, {7}, {}},
      {"fp8", DType::kF8E4M3, {2, 2}, {}},
  };
  uint32_t seed = 1;
  for (OwnedTensor& t : tensors) {
    int64_t numel = 1;
    for (const int64_t dim : t.shape) numel *= dim;
    t.data = random_bytes(static_cast<size_t>(numel) * dtype_size(t.dtype), seed++);
  }
  return tensors;
}

std::vector<TensorView> views_of(const std::vector<OwnedTensor>& tensors) {
  std::vector<TensorView> views;
  for (const OwnedTensor& t : tensors) views.push_back({t.name, t.dtype, t.shape, t.data});
  return views;
}

TEST(Safetensors, RoundTripIsBitExactWithPaddedHeaderAndMetadata) {
  ScratchDir dir;
  const std::filesystem::path path = dir / "model.safetensors";
  const std::vector<OwnedTensor> tensors = sample_tensors();
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "héllo"}};
  write_safetensors(path, views_of(tensors), metadata);

  const std::string raw = read_bytes(path);
  uint64_t header_size = 0;
  std::memcpy(&header_size, raw.data(), 8);
  EXPECT_EQ(header_size % 8, 0u);
  EXPECT_EQ(raw[8], '{');
  size_t total_data = 0;
  for (const OwnedTensor& t : tensors) total_data += t.data.size();
  EXPECT_EQ(raw.size(), 8 + header_size + total_data);
  const std::string header = raw.substr(8, header_size);
  EXPECT_EQ(header[header.find_last_not_of(' ')], '}') << "padding must be spaces";

  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.metadata(), metadata);
  ASSERT_EQ(file.tensors().size(), tensors.size());
  uint64_t expected_begin = 0;
  for (size_t tensor_idx = 0; tensor_idx < tensors.size(); ++tensor_idx) {
    const OwnedTensor& expected = tensors[tensor_idx];
    const TensorInfo& info = file.tensors()[tensor_idx];  // offset order == write order
    EXPECT_EQ(info.name, expected.name);
    EXPECT_EQ(info.dtype, expected.dtype) << expected.name;
    EXPECT_EQ(info.shape, expected.shape) << expected.name;
    EXPECT_EQ(info.begin, expected_begin) << expected.name;
    EXPECT_EQ(info.end - info.begin, expected.data.size()) << expected.name;
    expected_begin = info.end;
    const TensorInfo* found = file.find(expected.name);
    ASSERT_EQ(found, &info);
    const std::span<const std::byte> data = file.data(info);
    ASSERT_EQ(data.size(), expected.data.size());
    EXPECT_TRUE(std::equal(data.begin(), data.end(), expected.data.begin())) << expected.name;
  }
  EXPECT_EQ(file.find("scale")->numel(), 1);
  EXPECT_EQ(file.find("empty")->numel(), 0);
  EXPECT_EQ(file.find("missing"), nullptr);
  EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"model.safetensors"});
}

TEST(Safetensors, EmptyFileAndNoMetadataRoundTrip) {
  ScratchDir dir;
  write_safetensors(dir / "a.safetensors", {}, {});
  const SafetensorsFile file = SafetensorsFile::open(dir / "a.safetensors");
  EXPECT_TRUE(file.tensors().empty());
  EXPECT_TRUE(file.metadata().empty());
  EXPECT_EQ(read_bytes(dir / "a.safetensors").substr(8), "{}      ");
}

// Files written by others: unpadded header (so the data is unaligned), trailing spaces, keys in
// an order different from the offsets, empty tensors sharing an offset.
TEST(Safetensors, ReadsUnpaddedHeaderWithUnsortedKeys) {
  ScratchDir dir;
  const std::string header = R"({"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("a":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},)"
                             R"("e":{"dtype":"F16","shape":[0],"data_offsets":[8,8]},)"
                             R"("f":{"dtype":"I32","shape":[0,2],"data_offsets":[8,8]}}   )";
  ASSERT_NE((8 + header.size()) % 4, 0u);
  const float z = 1.5f;
  const uint16_t a[2] = {0x3F80, 0xC000};
  std::string data(8, '\0');
  std::memcpy(data.data(), &z, 4);
  std::memcpy(data.data() + 4, a, 4);
  write_bytes(dir / "x.safetensors", u64_le(header.size()) + header + data);

  const SafetensorsFile file = SafetensorsFile::open(dir / "x.safetensors");
  ASSERT_EQ(file.tensors().size(), 4u);
  EXPECT_EQ(file.tensors()[0].name, "z");
  EXPECT_EQ(file.tensors()[1].name, "a");
  float out[2] = {};
  convert_to_float(DType::kF32, file.data(*file.find("z")).data(), out, 1);
  EXPECT_EQ(out[0], 1.5f);
  convert_to_float(DType::kBF16, file.data(*file.find("a")).data(), out, 2);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(file.data(*file.find("f")).size(), 0u);
}

TEST(Safetensors, WriterRejectsBadInput) {
  ScratchDir dir;
  const std::vector<std::byte> eight(8);
  const std::filesystem::path path = dir / "w.safetensors";
  expect_error(
      [&] {
        write_safetensors(path, {{"a", DType::kF32, {3}, eight}}, {});
      },
      {"'a'", "8 bytes", "needs 12 bytes"});
  expect_error(
      [&] {
        write_safetensors(path, {{"a", DType::kF32, {2}, eight}, {"a", DType::kI64, {1}, eight}},
                          {});
      },
      {"duplicate tensor name 'a'"});
  expect_error(
      [&] {
        write_safetensors(path, {{"a", DType::kF32, {-2}, eight}}, {});
      },
      {"'a'", "[-2]"});
  expect_error(
      [&] {
        write_safetensors(path, {{"__metadata__", DType::kU8, {8}, eight}}, {});
      },
      {"reserved"});
  EXPECT_TRUE(list_dir(dir.path()).empty()) << "nothing written on error";
}

class SafetensorsReject : public ::testing::Test {
 protected:
  // Opens the file, expecting an error naming the file and each fragment.
  void expect_rejected(std::vector<std::string> fragments) {
    fragments.push_back("bad.safetensors");
    expect_error([&] { SafetensorsFile::open(path_); }, fragments);
  }
  void write_header(const std::string& header, size_t num_data_bytes) {
    write_raw(path_, header, num_data_bytes);
  }

  ScratchDir dir_;
  std::filesystem::path path_ = dir_ / "bad.safetensors";
};

TEST_F(SafetensorsReject, FileShorterThanEightBytes) {
  write_bytes(path_, std::string(5, '\0'));
  expect_rejected({"only 5 bytes", "8-byte"});
}

TEST_F(SafetensorsReject, HeaderLengthLargerThanFile) {
  write_raw(path_, "{}", 0, 100);
  expect_rejected({"header length 100", "runs past the end"});
}

TEST_F(SafetensorsReject, HeaderOverTheSizeLimit) {
  write_raw(path_, "{}", 0, 100'000'001);
  expect_rejected({"header length 100000001", "exceeds the limit"});
}

TEST_F(SafetensorsReject, HeaderNotJson) {
  write_header("{not json}", 0);
  expect_rejected({"not valid UTF-8 JSON"});
}

TEST_F(SafetensorsReject, HeaderNotUtf8) {
  write_header("{\"\xff\xfe\":{}}", 0);
  expect_rejected({"not valid UTF-8 JSON"});
}

TEST_F(SafetensorsReject, HeaderNotAnObject) {
  write_header("[1, 2]", 0);
  expect_rejected({"must be a JSON object"});
}

TEST_F(SafetensorsReject, EntryNotAnObjectOrMissingFields) {
  write_header(R"({"a":[1]})", 0);
  expect_rejected({"tensor 'a'", "must be an object"});
  write_header(R"({"a":{"dtype":"F32","shape":[0]}})", 0);
  expect_rejected({"tensor 'a'", "data_offsets"});
  write_header(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"extra":1}})", 0);
  expect_rejected({"tensor 'a'", "unknown field 'extra'"});
  write_header(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4);
  expect_rejected({"tensor 'a'", "integers"});
}

TEST_F(SafetensorsReject, UnknownDtype) {
  write_header(R"({"w":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected({"tensor 'w'", "unknown dtype 'F17'", "BF16"});
}

TEST_F(SafetensorsReject, NegativeShape) {
  write_header(R"({"w":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,0]}})", 0);
  expect_rejected({"tensor 'w'", "negative dimension"});
}

TEST_F(SafetensorsReject, WrongByteCountForShape) {
  write_header(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  expect_rejected({"tensor 'w'", "hold 8 bytes", "needs 12 bytes"});
}

TEST_F(SafetensorsReject, OverlappingOffsets) {
  write_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
               12);
  expect_rejected({"tensor 'b'", "[4, 12)", "overlap", "'a'"});
}

TEST_F(SafetensorsReject, HoleBetweenTensors) {
  write_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
               20);
  expect_rejected({"tensor 'b'", "hole of 4 bytes", "'a'"});
}

TEST_F(SafetensorsReject, FirstTensorNotAtZero) {
  write_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16);
  expect_rejected({"tensor 'a'", "hole of 8 bytes", "begin at 0"});
}

TEST_F(SafetensorsReject, OffsetsOutOfRange) {
  write_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F64","shape":[1000],"data_offsets":[8,8008]}})",
               8);
  expect_rejected({"tensor 'b'", "ends at byte 8008", "truncated"});
}

TEST_F(SafetensorsReject, TruncatedDataBuffer) {
  write_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 12);
  expect_rejected({"tensor 'a'", "truncated", "only 12 bytes"});
}

TEST_F(SafetensorsReject, TrailingBytesAfterBuffer) {
  write_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12);
  expect_rejected({"4 trailing bytes"});
}

TEST_F(SafetensorsReject, DuplicateTensorNames) {
  write_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
               R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               8);
  expect_rejected({"duplicate tensor name 'a'"});
}

TEST_F(SafetensorsReject, DuplicateFieldInsideEntry) {
  write_header(R"({"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected({"duplicate key 'dtype'", "'a'"});
}

TEST_F(SafetensorsReject, MetadataNotStringMap) {
  write_header(R"({"__metadata__":{"format":"pt","step":3}})", 0);
  expect_rejected({"__metadata__", "'step'", "must be a string"});
  write_header(R"({"__metadata__":"pt"})", 0);
  expect_rejected({"__metadata__", "must be an object"});
}

TEST_F(SafetensorsReject, MissingFile) {
  expect_rejected({"cannot open", "No such file"});
}

}  // namespace
}  // namespace moeforge::io
