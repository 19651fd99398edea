// Tests of the prefill Q/K/V dump (infer/qkv_dump.h): the captured rows are the ones attention
// reads at each position (a one-token decode step after a shorter prefill reproduces the last
// row of q, k and v: RoPE at the right position, after q/k norm), the file round-trips exactly,
// and malformed files are rejected with errors that say what is wrong.
#include "infer/qkv_dump.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_test_configs.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

fs::path temp_path(const std::string& name) {
  return fs::temp_directory_path() / ("moeforge-qkv-" + std::to_string(::getpid()) + "-" + name);
}

std::vector<int32_t> prompt_tokens(const ModelConfig& config, int64_t n) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tokens[i] = static_cast<int32_t>((7 * i + 3) % config.vocab_size);
  return tokens;
}

// The last row of a token-major [n, row] buffer.
std::vector<float> last_row(const std::vector<float>& x, int64_t n, int64_t row) {
  return {x.begin() + (n - 1) * row, x.begin() + n * row};
}

void expect_rows_near(const std::vector<float>& got, const std::vector<float>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5f * (1.0f + std::abs(want[i]))) << what << "[" << i << "]";
  }
}

TEST(PrefillQkv, CapturedRowsAreWhatAttentionReadsAtEachPosition) {
  for (const Architecture arch : {Architecture::kQwen3, Architecture::kMixtral}) {
    SCOPED_TRACE(architecture_name(arch));
    const ModelConfig config = testing::tiny_config(arch);
    SelfCommunicator self;
    Transformer<float> model(config, self);
    model.init_random(5, 0.3);
    const int64_t n = 11, layer = 1;
    const std::vector<int32_t> tokens = prompt_tokens(config, n);
    std::vector<float> logits(static_cast<size_t>(config.vocab_size));

    KvCache<float> full(config, n);
    model.forward_incremental(tokens.data(), n, full, logits.data());
    const PrefillQkv qkv = capture_prefill_qkv(model, full, layer);
    // Another layer's dump differs (the dump is of the layer asked for).
    EXPECT_NE(capture_prefill_qkv(model, full, 0).q, qkv.q);
    EXPECT_EQ(qkv.num_positions, n);
    EXPECT_EQ(qkv.q.size(), static_cast<size_t>(n * config.q_dim()));
    EXPECT_EQ(qkv.k.size(), static_cast<size_t>(n * config.kv_dim()));

    // Prefill n - 1 tokens, then decode the last one: its q, k, v rows are the dump's last rows.
    KvCache<float> stepwise(config, n);
    model.forward_incremental(tokens.data(), n - 1, stepwise, logits.data());
    model.forward_incremental(tokens.data() + n - 1, 1, stepwise, logits.data());
    const std::vector<float>& q = model.last_queries(layer);
    expect_rows_near({q.begin(), q.begin() + config.q_dim()}, last_row(qkv.q, n, config.q_dim()),
                     "q");
    const auto l = static_cast<size_t>(layer);
    expect_rows_near(last_row({stepwise.k[l].begin(), stepwise.k[l].begin() + n * config.kv_dim()},
                              n, config.kv_dim()),
                     last_row(qkv.k, n, config.kv_dim()), "k");
    expect_rows_near(last_row({stepwise.v[l].begin(), stepwise.v[l].begin() + n * config.kv_dim()},
                              n, config.kv_dim()),
                     last_row(qkv.v, n, config.kv_dim()), "v");
    // After the one-token step the model no longer holds the prefill's queries.
    EXPECT_THROW(capture_prefill_qkv(model, full, layer), Error);
  }
}

TEST(PrefillQkv, FileRoundTripsExactly) {
  PrefillQkv qkv{3, 5, 4, 2, 6, {}, {}, {}};
  for (int64_t i = 0; i < 5 * 4 * 6; ++i) qkv.q.push_back(0.25f * static_cast<float>(i) - 7.0f);
  for (int64_t i = 0; i < 5 * 2 * 6; ++i) {
    qkv.k.push_back(1.0f / static_cast<float>(i + 1));
    qkv.v.push_back(-static_cast<float>(i) * 1e-3f);
  }
  const fs::path path = temp_path("roundtrip.safetensors");
  write_prefill_qkv(path, qkv);
  const PrefillQkv back = read_prefill_qkv(path);
  EXPECT_EQ(back.layer, 3);
  EXPECT_EQ(back.num_positions, 5);
  EXPECT_EQ(back.num_heads, 4);
  EXPECT_EQ(back.num_kv_heads, 2);
  EXPECT_EQ(back.head_dim, 6);
  EXPECT_EQ(back.q, qkv.q);
  EXPECT_EQ(back.k, qkv.k);
  EXPECT_EQ(back.v, qkv.v);
  fs::remove(path);
}

void expect_read_error(const fs::path& path, const std::string& fragment) {
  try {
    read_prefill_qkv(path);
    ADD_FAILURE() << "no error for " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(PrefillQkv, MalformedFilesAreRejected) {
  const std::vector<float> q(2 * 2 * 4, 1.0f), kv(2 * 1 * 4, 1.0f);
  const auto view = [](const std::string& name, std::vector<int64_t> shape,
                       const std::vector<float>& data) {
    return io::TensorView{name, io::DType::kF32, std::move(shape),
                          std::as_bytes(std::span<const float>(data))};
  };
  const std::map<std::string, std::string> good = {{"format", "moeforge-prefill-qkv"},
                                                   {"format_version", "1"},
                                                   {"layer", "0"},
                                                   {"num_heads", "2"},
                                                   {"num_kv_heads", "1"},
                                                   {"head_dim", "4"}};
  const fs::path path = temp_path("bad.safetensors");

  io::write_safetensors(path, {view("q", {2, 2, 4}, q), view("k", {2, 1, 4}, kv)}, {});
  expect_read_error(path, "not a Q/K/V dump");

  std::map<std::string, std::string> meta = good;
  meta["num_kv_heads"] = "two";
  io::write_safetensors(
      path, {view("q", {2, 2, 4}, q), view("k", {2, 1, 4}, kv), view("v", {2, 1, 4}, kv)}, meta);
  expect_read_error(path, "\"num_kv_heads\" is \"two\"");

  io::write_safetensors(path, {view("q", {2, 2, 4}, q), view("k", {2, 1, 4}, kv)}, good);
  expect_read_error(path, "no tensor \"v\"");

  io::write_safetensors(
      path, {view("q", {2, 2, 4}, q), view("k", {1, 2, 4}, kv), view("v", {2, 1, 4}, kv)}, good);
  expect_read_error(path, "tensor \"k\" has shape [1, 2, 4], expected [2, 1, 4]");
  fs::remove(path);
}

TEST(PrefillQkv, LayerOutsideTheModelIsAnError) {
  const ModelConfig config = testing::tiny_config(Architecture::kLlama);
  SelfCommunicator self;
  Transformer<float> model(config, self);
  KvCache<float> cache(config, 4);
  EXPECT_THROW(capture_prefill_qkv(model, cache, config.num_layers), Error);
  EXPECT_THROW(capture_prefill_qkv(model, cache, -1), Error);
}

}  // namespace
}  // namespace moeforge
