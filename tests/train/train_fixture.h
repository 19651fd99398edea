// A tiny dataset and MoE config in a scratch folder, for trainer and checkpoint tests.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/rng.h"
#include "data/prepare.h"
#include "train/train_config.h"

namespace moeforge::testing {

class TrainFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() /
            ("moeforge-train-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_ / "text");
    Rng rng(17);
    const char* words[] = {"the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"};
    for (int doc = 0; doc < 12; ++doc) {
      std::ofstream out(root_ / "text" / ("doc" + std::to_string(doc) + ".txt"));
      for (int w = 0; w < 400; ++w) out << words[rng.below(10)] << (w % 9 == 8 ? ".\n" : " ");
    }
    data::PrepareOptions prep;
    prep.inputs = {root_ / "text"};
    prep.out_dir = root_ / "data";
    prep.val_fraction = 0.2;
    data::prepare_dataset(prep);
    std::ofstream(root_ / "model.json") << R"({
      "architectures": ["MixtralForCausalLM"], "vocab_size": 258, "hidden_size": 16,
      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
      "intermediate_size": 24, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "num_local_experts": 4, "num_experts_per_tok": 2,
      "router_aux_loss_coef": 0.01, "tie_word_embeddings": false})";
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  TrainConfig config(int64_t max_steps, int64_t grad_accum = 1) const {
    nlohmann::json j = {
        {"model", {{"model_config", (root_ / "model.json").string()}, {"seed", 3}}},
        {"data",
         {{"dataset", (root_ / "data").string()},
          {"seq_len", 16},
          {"micro_batch_size", 4},
          {"grad_accum_steps", grad_accum}}},
        {"optimizer", {{"lr", 1e-2}}},
        {"schedule", {{"type", "cosine"}, {"warmup_steps", 2}, {"max_steps", max_steps}}},
        {"checkpoint", {{"dir", (root_ / "run").string()}, {"every_steps", 3}}},
        {"eval", {{"every_steps", 0}, {"max_batches", 2}}},
        {"log", {{"every_steps", 1}}}};
    return train_config_from_json(j, root_);
  }

  std::filesystem::path root_;
};

}  // namespace moeforge::testing
