// Tests of TokenDataset (shards as one stream, eval windows) and BatchSampler (epoch
// permutations, resumable state, data-parallel slicing).
#include "data/loader.h"

#include "core/error.h"
#include "data/prepare.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <numeric>

namespace moeforge::data {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::write_file;

constexpr int64_t kVocabSize = 100000;

// A dataset whose train stream is 0, 1, 2, ... (so a window is known by its first token), cut
// into shards of uneven sizes.
void write_dataset(const fs::path& dir, const std::vector<int64_t>& shard_sizes) {
  fs::create_directories(dir);
  nlohmann::json shards = nlohmann::json::array();
  int64_t next_token = 0;
  for (size_t shard_idx = 0; shard_idx < shard_sizes.size(); ++shard_idx) {
    std::vector<int32_t> tokens(static_cast<size_t>(shard_sizes[shard_idx]));
    std::iota(tokens.begin(), tokens.end(), static_cast<int32_t>(next_token));
    next_token += shard_sizes[shard_idx];
    std::string name = "train-0000" + std::to_string(shard_idx) + ".bin";
    write_token_shard(dir / name, tokens, kVocabSize);
    shards.push_back({{"file", name}, {"num_tokens", shard_sizes[shard_idx]}});
  }
  nlohmann::json dataset = {{"format_version", 1},
                            {"vocab_size", kVocabSize},
                            {"splits",
                             {{"train", {{"num_tokens", next_token}, {"shards", shards}}},
                              {"val", {{"num_tokens", 0}, {"shards", nlohmann::json::array()}}}}}};
  write_file(dir / kDatasetJsonName, dataset.dump());
}

class LoaderTest : public ::testing::Test {
 protected:
  static constexpr int64_t kSeqLen = 8;
  void SetUp() override { write_dataset(dir_.path(), {100, 37, 1, 163}); }

  TokenDataset open() { return TokenDataset::open(dir_.path(), "train"); }
  // The window index of each row of a batch.
  static std::vector<int64_t> rows_to_windows(const std::vector<int32_t>& inputs,
                                              const std::vector<int32_t>& targets) {
    std::vector<int64_t> windows;
    for (size_t row_start = 0; row_start < inputs.size(); row_start += kSeqLen) {
      EXPECT_EQ(inputs[row_start] % kSeqLen, 0);
      for (int64_t t = 0; t < kSeqLen; ++t) {
        EXPECT_EQ(inputs[row_start + t], inputs[row_start] + t);
        EXPECT_EQ(targets[row_start + t], inputs[row_start] + t + 1);
      }
      windows.push_back(inputs[row_start] / kSeqLen);
    }
    return windows;
  }
  static std::vector<int64_t> take(BatchSampler& sampler, int64_t batch_size) {
    std::vector<int32_t> inputs(batch_size * kSeqLen);
    std::vector<int32_t> targets(batch_size * kSeqLen);
    sampler.next_batch(batch_size, inputs.data(), targets.data());
    return rows_to_windows(inputs, targets);
  }

  TempDir dir_;
};

TEST_F(LoaderTest, DatasetReadsAcrossShards) {
  TokenDataset dataset = open();
  EXPECT_EQ(dataset.num_tokens(), 301);
  EXPECT_EQ(dataset.vocab_size(), kVocabSize);
  std::vector<int32_t> all(301);
  dataset.read(0, 301, all.data());
  for (int32_t token_idx = 0; token_idx < 301; ++token_idx) ASSERT_EQ(all[token_idx], token_idx);
  std::vector<int32_t> across(5);
  dataset.read(135, 5, across.data());
  EXPECT_EQ(across, (std::vector<int32_t>{135, 136, 137, 138, 139}));
  std::string message = MF_ERROR_MESSAGE(dataset.read(300, 2, across.data()));
  EXPECT_NE(message.find("range [300, 302) is outside its 301 tokens"), std::string::npos)
      << message;
}

TEST_F(LoaderTest, EvalWindowsAreInStreamOrder) {
  TokenDataset dataset = open();
  ASSERT_EQ(dataset.num_windows(kSeqLen), 300 / kSeqLen);
  std::vector<int32_t> inputs(kSeqLen);
  std::vector<int32_t> targets(kSeqLen);
  dataset.read_window(kSeqLen, 16, inputs.data(), targets.data());
  EXPECT_EQ(inputs.front(), 128);
  EXPECT_EQ(targets.back(), 136);
  dataset.read_window(kSeqLen, 36, inputs.data(), targets.data());
  EXPECT_EQ(targets.back(), 296);
  EXPECT_THROW(dataset.read_window(kSeqLen, 37, inputs.data(), targets.data()), Error);
  // A stream of exactly seq_len + 1 tokens has one window.
  EXPECT_EQ(dataset.num_windows(300), 1);
  EXPECT_EQ(dataset.num_windows(301), 0);
}

TEST_F(LoaderTest, DatasetChecksShardsAgainstDatasetJson) {
  write_token_shard(dir_ / "train-00001.bin", std::vector<int32_t>(36, 0), kVocabSize);
  std::string message = MF_ERROR_MESSAGE(open());
  EXPECT_NE(message.find("shard 'train-00001.bin' holds 36 tokens but dataset.json lists 37"),
            std::string::npos)
      << message;
  EXPECT_NE(MF_ERROR_MESSAGE(TokenDataset::open(dir_.path(), "test")).find("split 'test'"),
            std::string::npos);
}

TEST_F(LoaderTest, EpochVisitsEveryWindowOnceAndIsSeedDeterministic) {
  TokenDataset dataset = open();
  BatchSampler sampler(dataset, kSeqLen, 42);
  const int64_t num_windows = sampler.num_windows();
  ASSERT_EQ(num_windows, 37);
  // Batches of 5 do not divide 37: the last batch of the epoch spills into epoch 1.
  std::vector<int64_t> visited;
  while (static_cast<int64_t>(visited.size()) < 2 * num_windows) {
    std::vector<int64_t> batch = take(sampler, 5);
    visited.insert(visited.end(), batch.begin(), batch.end());
  }
  std::vector<int64_t> epoch0(visited.begin(), visited.begin() + num_windows);
  std::vector<int64_t> epoch1(visited.begin() + num_windows, visited.begin() + 2 * num_windows);
  EXPECT_EQ(epoch0, sampler.epoch_order(0));
  EXPECT_EQ(epoch1, sampler.epoch_order(1));
  EXPECT_NE(epoch0, epoch1);
  std::vector<int64_t> sorted = epoch0;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> all(num_windows);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(sorted, all);
  std::sort(epoch1.begin(), epoch1.end());
  EXPECT_EQ(epoch1, all);
  std::vector<int64_t> identity(num_windows);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(sampler.epoch_order(0), identity) << "epochs must be shuffled";

  BatchSampler same_seed(dataset, kSeqLen, 42);
  BatchSampler other_seed(dataset, kSeqLen, 43);
  EXPECT_EQ(same_seed.epoch_order(3), sampler.epoch_order(3));
  EXPECT_NE(other_seed.epoch_order(0), sampler.epoch_order(0));
}

TEST_F(LoaderTest, StateRoundTripContinuesTheSameSequence) {
  TokenDataset dataset = open();
  BatchSampler sampler(dataset, kSeqLen, 7);
  for (int step = 0; step < 9; ++step) take(sampler, 4);
  const LoaderState saved = sampler.state();
  EXPECT_EQ(saved.epoch, 0u);
  EXPECT_EQ(saved.position, 36u);
  nlohmann::json j = saved;
  EXPECT_EQ(j.dump(), R"({"epoch":0,"position":36})");

  std::vector<std::vector<int64_t>> continued;
  for (int step = 0; step < 20; ++step) continued.push_back(take(sampler, 4));

  BatchSampler resumed(dataset, kSeqLen, 7);
  resumed.set_state(nlohmann::json::parse(j.dump()).get<LoaderState>());
  for (int step = 0; step < 20; ++step) EXPECT_EQ(take(resumed, 4), continued[step]) << step;
  EXPECT_EQ(resumed.state(), sampler.state());
  EXPECT_EQ(sampler.state(), (LoaderState{3, 5}));  // 116 windows of 37 per epoch
}

TEST_F(LoaderTest, StateErrorsNameTheProblem) {
  TokenDataset dataset = open();
  BatchSampler sampler(dataset, kSeqLen, 7);
  std::string message = MF_ERROR_MESSAGE(sampler.set_state({0, 37}));
  EXPECT_NE(message.find("position 37 is not inside an epoch of 37 windows"), std::string::npos)
      << message;
  message = MF_ERROR_MESSAGE(nlohmann::json({{"epoch", 1}}).get<LoaderState>());
  EXPECT_NE(message.find("field 'position'"), std::string::npos) << message;
  message = MF_ERROR_MESSAGE(nlohmann::json({{"epoch", -1}, {"position", 0}}).get<LoaderState>());
  EXPECT_NE(message.find("field 'epoch'"), std::string::npos) << message;
}

TEST_F(LoaderTest, SkipMatchesConsuming) {
  TokenDataset dataset = open();
  BatchSampler reading(dataset, kSeqLen, 3);
  BatchSampler skipping(dataset, kSeqLen, 3);
  take(reading, 50);
  skipping.skip(50);
  EXPECT_EQ(skipping.state(), reading.state());
  EXPECT_EQ(skipping.state(), (LoaderState{1, 13}));
  EXPECT_EQ(take(skipping, 6), take(reading, 6));
}

TEST_F(LoaderTest, RankSlicesConcatenateToTheGlobalBatch) {
  TokenDataset dataset = open();
  constexpr int64_t kBatch = 3;
  BatchSampler global(dataset, kSeqLen, 11);
  BatchSampler rank0(dataset, kSeqLen, 11);
  BatchSampler rank1(dataset, kSeqLen, 11);
  BatchSampler single(dataset, kSeqLen, 11);
  BatchSampler single_reference(dataset, kSeqLen, 11);
  std::vector<int32_t> inputs(kBatch * kSeqLen);
  std::vector<int32_t> targets(kBatch * kSeqLen);
  // 15 steps of 6 windows cross two epoch boundaries (37 windows per epoch).
  for (int step = 0; step < 15; ++step) {
    std::vector<int64_t> expected = take(global, 2 * kBatch);
    rank0.next_batch_for_rank(kBatch, 0, 2, inputs.data(), targets.data());
    std::vector<int64_t> got = rows_to_windows(inputs, targets);
    rank1.next_batch_for_rank(kBatch, 1, 2, inputs.data(), targets.data());
    std::vector<int64_t> got1 = rows_to_windows(inputs, targets);
    got.insert(got.end(), got1.begin(), got1.end());
    EXPECT_EQ(got, expected) << step;

    single.next_batch_for_rank(kBatch, 0, 1, inputs.data(), targets.data());
    EXPECT_EQ(rows_to_windows(inputs, targets), take(single_reference, kBatch)) << step;
  }
  EXPECT_EQ(rank0.state(), global.state());
  EXPECT_EQ(rank1.state(), global.state());
  EXPECT_THROW(rank0.next_batch_for_rank(kBatch, 2, 2, inputs.data(), targets.data()), Error);
}

TEST_F(LoaderTest, TooFewTokensForOneWindow) {
  TokenDataset dataset = open();
  std::string message = MF_ERROR_MESSAGE(BatchSampler(dataset, 300, 0));
  EXPECT_EQ(message, "");
  message = MF_ERROR_MESSAGE(BatchSampler(dataset, 301, 0));
  EXPECT_NE(message.find("301 tokens, too few for one window of seq_len 301 (needs 302"),
            std::string::npos)
      << message;
  TokenDataset val = TokenDataset::open(dir_.path(), "val");
  EXPECT_THROW(BatchSampler(val, 4, 0), Error);
}

}  // namespace
}  // namespace moeforge::data
