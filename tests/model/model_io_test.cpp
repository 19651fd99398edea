// HF model directories: write then read gives the weights back bit for bit (F32) or rounded to
// nearest even (BF16); sharding past the limit; clear errors for missing, mis-shaped and foreign
// tensors.
#include "model/model_io.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "comm/communicator.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_test_configs.h"
#include "model/transformer.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

class ModelIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("moeforge-model-io-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_F(ModelIoTest, RoundTripIsBitExactForEveryArchitecture) {
  for (Architecture arch : testing::all_architectures()) {
    const ModelConfig c = testing::tiny_config(arch);
    SelfCommunicator self;
    Transformer<float> model(c, self);
    model.init_random(21, 0.7);
    const fs::path out = dir_ / architecture_model_type(arch);
    fs::create_directories(out);
    write_hf_model(out, c, model.layout(), model.params().data(), io::DType::kF32);
    EXPECT_EQ(load_model_config(out / "config.json"), c) << architecture_name(arch);
    std::vector<float> back(model.params().size(), -1.0f);
    read_hf_weights(out, model.layout(), back.data());
    EXPECT_EQ(0, std::memcmp(back.data(), model.params().data(), back.size() * sizeof(float)))
        << architecture_name(arch);
  }
}

TEST_F(ModelIoTest, Bf16ExportRoundsToNearestEven) {
  const ModelConfig c = testing::tiny_config(Architecture::kQwen3Moe);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  model.init_random(4, 0.5);
  model.params()[0] = 1.0f + 0x1.0p-8f;  // halfway between two bf16 values: rounds to even (1.0)
  model.params()[1] = 1.0f + 0x1.8p-7f;  // halfway: rounds up to even (1 + 2^-6)
  write_hf_model(dir_, c, model.layout(), model.params().data(), io::DType::kBF16);
  std::vector<float> back(model.params().size());
  read_hf_weights(dir_, model.layout(), back.data());
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.0f + 0x1.0p-6f);
  for (size_t i = 2; i < back.size(); ++i) {
    ASSERT_LE(std::abs(back[i] - model.params()[i]), std::abs(model.params()[i]) * 0x1.0p-8f) << i;
  }
  EXPECT_EQ(load_model_config(dir_ / "config.json").torch_dtype, "bfloat16");
}

TEST_F(ModelIoTest, ShardsPastTheLimitWithAnIndex) {
  const ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  model.init_random(8, 0.1);
  write_hf_model(dir_, c, model.layout(), model.params().data(), io::DType::kF32, 2048);
  EXPECT_TRUE(fs::exists(dir_ / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors"));
  std::vector<float> back(model.params().size());
  read_hf_weights(dir_, model.layout(), back.data());
  EXPECT_EQ(0, std::memcmp(back.data(), model.params().data(), back.size() * sizeof(float)));
}

TEST_F(ModelIoTest, MismatchedWeightsAreRejectedByName) {
  const ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  write_hf_model(dir_, c, model.layout(), model.params().data(), io::DType::kF32);
  std::vector<float> back(model.params().size());

  ModelConfig wider = c;
  wider.hidden_size = 12;
  const ParameterLayout wider_layout(wider);
  EXPECT_NE(error_of([&] { read_hf_weights(dir_, wider_layout, back.data()); }).find("has shape"),
            std::string::npos);

  ModelConfig more_experts = c;
  more_experts.num_experts = 5;
  const ParameterLayout more_layout(more_experts);
  const std::string more_error = error_of([&] { read_hf_weights(dir_, more_layout, back.data()); });
  EXPECT_NE(
      more_error.find("block_sparse_moe.gate.weight has shape [4, 8], config.json implies [5, 8]"),
      std::string::npos)
      << more_error;

  ModelConfig with_qk_norm = c;
  with_qk_norm.qk_norm = true;
  const ParameterLayout qk_layout(with_qk_norm);
  const std::string qk_error = error_of([&] { read_hf_weights(dir_, qk_layout, back.data()); });
  EXPECT_NE(qk_error.find("model.layers.0.self_attn.q_norm.weight is missing"), std::string::npos)
      << qk_error;

  ModelConfig fewer_layers = c;
  fewer_layers.num_layers = 1;
  const ParameterLayout fewer_layout(fewer_layers);
  EXPECT_NE(error_of([&] {
              read_hf_weights(dir_, fewer_layout, back.data());
            }).find("does not belong to this architecture"),
            std::string::npos);
}

}  // namespace
}  // namespace moeforge
