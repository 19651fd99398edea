// Tests of TokenDataset (shards as one stream, eval windows, loss masks) and BatchSampler (epoch
// permutations, resumable state, data-parallel slicing).
#include "data/loader.h"

#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/prepare.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <numeric>

namespace moeforge::data {
namespace {

namespace fs = std::filesystem;
using testing::add_loss_mask;
using testing::mask_value;
using testing::read_file;
using testing::stream_windows;
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
  ASSERT_EQ(stream_windows(dataset, kSeqLen).num_windows(), 300 / kSeqLen);
  std::vector<int32_t> inputs(kSeqLen);
  std::vector<int32_t> targets(kSeqLen);
  stream_windows(dataset, kSeqLen).read(16, inputs.data(), targets.data());
  EXPECT_EQ(inputs.front(), 128);
  EXPECT_EQ(targets.back(), 136);
  stream_windows(dataset, kSeqLen).read(36, inputs.data(), targets.data());
  EXPECT_EQ(targets.back(), 296);
  EXPECT_THROW(stream_windows(dataset, kSeqLen).read(37, inputs.data(), targets.data()), Error);
  // A stream of exactly seq_len + 1 tokens has one window.
  EXPECT_EQ(stream_windows(dataset, 300).num_windows(), 1);
  EXPECT_EQ(stream_windows(dataset, 301).num_windows(), 0);
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

TEST_F(LoaderTest, LossMaskTurnsUncountedTargetsIntoMinusOne) {
  const TokenDataset plain = open();
  EXPECT_FALSE(plain.has_loss_mask());
  add_loss_mask(dir_.path());
  const TokenDataset masked = open();
  EXPECT_TRUE(masked.has_loss_mask());
  EXPECT_EQ(masked.num_tokens(), plain.num_tokens());
  ASSERT_EQ(stream_windows(masked, kSeqLen).num_windows(),
            stream_windows(plain, kSeqLen).num_windows());

  // Window 12 (targets 97..104) crosses from shard 0 into shard 1 at token 100.
  std::vector<int32_t> inputs(kSeqLen);
  std::vector<int32_t> targets(kSeqLen);
  stream_windows(masked, kSeqLen).read(12, inputs.data(), targets.data());
  EXPECT_EQ(inputs, (std::vector<int32_t>{96, 97, 98, 99, 100, 101, 102, 103}));
  EXPECT_EQ(targets, (std::vector<int32_t>{97, -1, -1, -1, 101, 102, 103, 104}));
  // Window 17 (targets 137..144) crosses shards 1, 2 and 3 (the 1-token shard is token 137).
  stream_windows(masked, kSeqLen).read(17, inputs.data(), targets.data());
  EXPECT_EQ(targets, (std::vector<int32_t>{137, 138, 139, -1, -1, -1, 143, 144}));

  // Every window: the inputs are unmasked, a target is kept where the mask counts it, else -1.
  std::vector<int32_t> plain_inputs(kSeqLen);
  std::vector<int32_t> plain_targets(kSeqLen);
  int64_t num_counted = 0;
  int64_t num_ignored = 0;
  for (int64_t window_idx = 0; window_idx < stream_windows(masked, kSeqLen).num_windows();
       ++window_idx) {
    stream_windows(masked, kSeqLen).read(window_idx, inputs.data(), targets.data());
    stream_windows(plain, kSeqLen).read(window_idx, plain_inputs.data(), plain_targets.data());
    EXPECT_EQ(inputs, plain_inputs) << window_idx;
    for (int64_t t = 0; t < kSeqLen; ++t) {
      const int32_t expected = mask_value(plain_targets[t]) == 1 ? plain_targets[t] : -1;
      EXPECT_EQ(targets[t], expected) << "window " << window_idx << " position " << t;
      (expected == -1 ? num_ignored : num_counted) += 1;
    }
  }
  EXPECT_GT(num_counted, 0);
  EXPECT_GT(num_ignored, 0);
  // read() is the raw stream, the mask does not touch it.
  std::vector<int32_t> all(301);
  masked.read(0, 301, all.data());
  for (int32_t token_idx = 0; token_idx < 301; ++token_idx) ASSERT_EQ(all[token_idx], token_idx);

  // BatchSampler reads through read_window: the same windows as unmasked, with the mask applied.
  const Windows masked_sampler_windows = stream_windows(masked, kSeqLen);
  BatchSampler masked_sampler(masked_sampler_windows, 5);
  const Windows plain_sampler_windows = stream_windows(plain, kSeqLen);
  BatchSampler plain_sampler(plain_sampler_windows, 5);
  std::vector<int32_t> batch_inputs(6 * kSeqLen);
  std::vector<int32_t> batch_targets(6 * kSeqLen);
  std::vector<int32_t> plain_batch_inputs(6 * kSeqLen);
  std::vector<int32_t> plain_batch_targets(6 * kSeqLen);
  for (int step = 0; step < 8; ++step) {
    masked_sampler.next_batch(6, batch_inputs.data(), batch_targets.data());
    plain_sampler.next_batch(6, plain_batch_inputs.data(), plain_batch_targets.data());
    EXPECT_EQ(batch_inputs, plain_batch_inputs) << step;
    for (size_t i = 0; i < batch_targets.size(); ++i) {
      const int32_t target = plain_batch_targets[i];
      EXPECT_EQ(batch_targets[i], mask_value(target) == 1 ? target : -1) << step << " " << i;
    }
  }
}

TEST_F(LoaderTest, LossMaskMustMatchItsShards) {
  add_loss_mask(dir_.path());
  const std::string dataset_json = read_file(dir_ / kDatasetJsonName);
  EXPECT_EQ(MF_ERROR_MESSAGE(open()), "");
  // The val split has no shards and an empty mask list: no mask to apply.
  EXPECT_FALSE(TokenDataset::open(dir_.path(), "val").has_loss_mask());

  nlohmann::json dataset = nlohmann::json::parse(dataset_json);
  dataset["splits"]["train"]["loss_mask_shards"].erase(3);
  write_file(dir_ / kDatasetJsonName, dataset.dump());
  std::string message = MF_ERROR_MESSAGE(open());
  EXPECT_NE(message.find("field 'splits.train.loss_mask_shards' must list one mask per shard (4)"),
            std::string::npos)
      << message;
  write_file(dir_ / kDatasetJsonName, dataset_json);

  write_token_shard(dir_ / "train-00001.mask.bin", std::vector<int32_t>(36, 1), 2);
  message = MF_ERROR_MESSAGE(open());
  EXPECT_NE(message.find("loss mask 'train-00001.mask.bin' holds 36 values but dataset.json lists "
                         "37"),
            std::string::npos)
      << message;
  nlohmann::json listed_36 = nlohmann::json::parse(dataset_json);
  listed_36["splits"]["train"]["loss_mask_shards"][1]["num_tokens"] = 36;
  write_file(dir_ / kDatasetJsonName, listed_36.dump());
  message = MF_ERROR_MESSAGE(open());
  EXPECT_NE(message.find("loss mask 'train-00001.mask.bin' holds 36 values of vocab 2, but its "
                         "shard has 37 tokens"),
            std::string::npos)
      << message;
  write_file(dir_ / kDatasetJsonName, dataset_json);

  write_token_shard(dir_ / "train-00001.mask.bin", std::vector<int32_t>(37, 1), 3);
  message = MF_ERROR_MESSAGE(open());
  EXPECT_NE(message.find("loss mask 'train-00001.mask.bin' holds 37 values of vocab 3"),
            std::string::npos)
      << message;

  fs::remove(dir_ / "train-00001.mask.bin");
  message = MF_ERROR_MESSAGE(open());
  EXPECT_NE(message.find("train-00001.mask.bin"), std::string::npos) << message;
}

TEST_F(LoaderTest, EpochVisitsEveryWindowOnceAndIsSeedDeterministic) {
  TokenDataset dataset = open();
  const Windows sampler_windows = stream_windows(dataset, kSeqLen);
  BatchSampler sampler(sampler_windows, 42);
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

  const Windows same_seed_windows = stream_windows(dataset, kSeqLen);
  BatchSampler same_seed(same_seed_windows, 42);
  const Windows other_seed_windows = stream_windows(dataset, kSeqLen);
  BatchSampler other_seed(other_seed_windows, 43);
  EXPECT_EQ(same_seed.epoch_order(3), sampler.epoch_order(3));
  EXPECT_NE(other_seed.epoch_order(0), sampler.epoch_order(0));
}

TEST_F(LoaderTest, StateRoundTripContinuesTheSameSequence) {
  TokenDataset dataset = open();
  const Windows sampler_windows = stream_windows(dataset, kSeqLen);
  BatchSampler sampler(sampler_windows, 7);
  for (int step = 0; step < 9; ++step) take(sampler, 4);
  const LoaderState saved = sampler.state();
  EXPECT_EQ(saved.epoch, 0u);
  EXPECT_EQ(saved.position, 36u);
  nlohmann::json j = saved;
  EXPECT_EQ(j.dump(), R"({"epoch":0,"position":36})");

  std::vector<std::vector<int64_t>> continued;
  for (int step = 0; step < 20; ++step) continued.push_back(take(sampler, 4));

  const Windows resumed_windows = stream_windows(dataset, kSeqLen);
  BatchSampler resumed(resumed_windows, 7);
  resumed.set_state(nlohmann::json::parse(j.dump()).get<LoaderState>());
  for (int step = 0; step < 20; ++step) EXPECT_EQ(take(resumed, 4), continued[step]) << step;
  EXPECT_EQ(resumed.state(), sampler.state());
  EXPECT_EQ(sampler.state(), (LoaderState{3, 5}));  // 116 windows of 37 per epoch
}

TEST_F(LoaderTest, StateErrorsNameTheProblem) {
  TokenDataset dataset = open();
  const Windows sampler_windows = stream_windows(dataset, kSeqLen);
  BatchSampler sampler(sampler_windows, 7);
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
  const Windows reading_windows = stream_windows(dataset, kSeqLen);
  BatchSampler reading(reading_windows, 3);
  const Windows skipping_windows = stream_windows(dataset, kSeqLen);
  BatchSampler skipping(skipping_windows, 3);
  take(reading, 50);
  skipping.skip(50);
  EXPECT_EQ(skipping.state(), reading.state());
  EXPECT_EQ(skipping.state(), (LoaderState{1, 13}));
  EXPECT_EQ(take(skipping, 6), take(reading, 6));
}

TEST_F(LoaderTest, RankSlicesConcatenateToTheGlobalBatch) {
  TokenDataset dataset = open();
  constexpr int64_t kBatch = 3;
  const Windows global_windows = stream_windows(dataset, kSeqLen);
  BatchSampler global(global_windows, 11);
  const Windows rank0_windows = stream_windows(dataset, kSeqLen);
  BatchSampler rank0(rank0_windows, 11);
  const Windows rank1_windows = stream_windows(dataset, kSeqLen);
  BatchSampler rank1(rank1_windows, 11);
  const Windows single_windows = stream_windows(dataset, kSeqLen);
  BatchSampler single(single_windows, 11);
  const Windows single_reference_windows = stream_windows(dataset, kSeqLen);
  BatchSampler single_reference(single_reference_windows, 11);
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
  std::string message = MF_ERROR_MESSAGE(BatchSampler(stream_windows(dataset, 300), 0));
  EXPECT_EQ(message, "");
  message = MF_ERROR_MESSAGE(BatchSampler(stream_windows(dataset, 301), 0));
  EXPECT_NE(message.find("301 tokens, too few for one window: seq_len 301 needs 302 tokens"),
            std::string::npos)
      << message;
  TokenDataset val = TokenDataset::open(dir_.path(), "val");
  EXPECT_THROW(BatchSampler(stream_windows(val, 4), 0), Error);
}

// A dataset prepared with a completion offset reads like the one prepared without it, except
// that the targets outside the completions are -1, across document and shard boundaries.
TEST(LoaderLossMask, PreparedCompletionMaskMatchesTheUnmaskedDataset) {
  TempDir dir;
  // Each document's text and where its completion starts.
  const std::vector<std::pair<std::string, size_t>> documents = {
      {"What is the capital of France? Paris", 31},
      {"2 + 2 = 4", 8},
      {"a prompt without completion", 27},
      {"all completion", 0},
  };
  for (size_t doc_idx = 0; doc_idx < documents.size(); ++doc_idx) {
    write_file(dir / "corpus" / ("doc" + std::to_string(doc_idx) + ".txt"),
               documents[doc_idx].first);
  }
  PrepareOptions options;
  options.inputs = {dir / "corpus"};
  options.out_dir = dir / "plain";
  options.val_fraction = 0.0;
  options.shard_tokens = 10;
  prepare_dataset(options);
  options.out_dir = dir / "masked";
  options.completion_spans = [&documents](const InputDocument& document) {
    return std::vector<CompletionSpan>{
        {documents.at(std::stoul(document.relative_path.substr(3))).second}};
  };
  prepare_dataset(options);

  // The mask of the stream, from the documents: 0 for BOS and the prompt, 1 for the completion
  // and EOS.
  std::vector<int32_t> stream_mask;
  for (const auto& [text, offset] : documents) {
    stream_mask.insert(stream_mask.end(), offset + 1, 0);
    stream_mask.insert(stream_mask.end(), text.size() - offset + 1, 1);
  }
  const TokenDataset plain = TokenDataset::open(dir / "plain", "train");
  const TokenDataset masked = TokenDataset::open(dir / "masked", "train");
  EXPECT_FALSE(plain.has_loss_mask());
  ASSERT_TRUE(masked.has_loss_mask());
  ASSERT_EQ(masked.num_tokens(), static_cast<int64_t>(stream_mask.size()));
  ASSERT_EQ(plain.num_tokens(), masked.num_tokens());

  constexpr int64_t kSeqLen = 6;
  std::vector<int32_t> inputs(kSeqLen);
  std::vector<int32_t> targets(kSeqLen);
  std::vector<int32_t> plain_inputs(kSeqLen);
  std::vector<int32_t> plain_targets(kSeqLen);
  for (int64_t window_idx = 0; window_idx < stream_windows(masked, kSeqLen).num_windows();
       ++window_idx) {
    stream_windows(masked, kSeqLen).read(window_idx, inputs.data(), targets.data());
    stream_windows(plain, kSeqLen).read(window_idx, plain_inputs.data(), plain_targets.data());
    EXPECT_EQ(inputs, plain_inputs) << window_idx;
    for (int64_t t = 0; t < kSeqLen; ++t) {
      const size_t token_idx = static_cast<size_t>(window_idx * kSeqLen + t + 1);
      EXPECT_EQ(targets[t], stream_mask[token_idx] == 1 ? plain_targets[t] : -1)
          << "window " << window_idx << " position " << t;
    }
  }

  // The stream: document 0 is tokens 0..37 (completion "Paris" 32..36, EOS 37), document 1
  // 38..48 ("4" 47, EOS 48), document 2 49..77 (EOS 77 only), document 3 78..93 (all but BOS);
  // shards of 10 tokens. Window w has targets 6w + 1 .. 6w + 6.
  const int32_t eos = ByteTokenizer::kEosId;
  const auto window_targets = [&](int64_t window_idx) {
    stream_windows(masked, kSeqLen).read(window_idx, inputs.data(), targets.data());
    return targets;
  };
  EXPECT_EQ(window_targets(5), (std::vector<int32_t>{-1, 'P', 'a', 'r', 'i', 's'}));
  // Across the boundary of documents 0 and 1 and of shards 3 and 4 (token 40).
  EXPECT_EQ(window_targets(6), (std::vector<int32_t>{eos, -1, -1, -1, -1, -1}));
  EXPECT_EQ(window_targets(7), (std::vector<int32_t>{-1, -1, -1, -1, '4', eos}));
  EXPECT_EQ(window_targets(12), (std::vector<int32_t>{-1, -1, -1, -1, eos, -1}));
  // Across the boundary of shards 7 and 8 (token 80), inside a completion.
  EXPECT_EQ(window_targets(13), (std::vector<int32_t>{'a', 'l', 'l', ' ', 'c', 'o'}));
}

}  // namespace
}  // namespace moeforge::data
