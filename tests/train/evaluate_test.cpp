// Tests of evaluate() and count_scored_targets() (train/evaluate.h) with a recording forward pass
// on a hand-built val split whose windows are known by their first token: which windows are scored
// (all, or max_batches * batch_size spread evenly), the token-weighted loss and bytes, the split
// across ranks, and the error when no scored target counts.
#include "train/evaluate.h"

#include "comm/communicator.h"
#include "comm/forwarding_communicator.h"
#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "data/test_util.h"
#include "data/token_shard.h"
#include "data/windows.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <numeric>
#include <set>
#include <vector>

namespace moeforge {
namespace {

namespace fs = std::filesystem;
using data::testing::TempDir;

constexpr int64_t kSeqLen = 8;
constexpr int64_t kNumWindows = 20;  // the val stream 0 .. 160 in stream windows of 8

// A byte-tokenizer dataset whose val stream is 0, 1, ..., kNumWindows * kSeqLen (one shard), so
// stream window w starts at token w * kSeqLen; with mask_every > 0 only targets t with
// t % mask_every == 0 count.
void write_val_dataset(const fs::path& dir, int64_t mask_every = 0) {
  fs::create_directories(dir);
  const int64_t num_tokens = kNumWindows * kSeqLen + 1;
  std::vector<int32_t> tokens(static_cast<size_t>(num_tokens));
  std::iota(tokens.begin(), tokens.end(), 0);
  data::write_token_shard(dir / "val-00000.bin", tokens, data::ByteTokenizer::kVocabSize);
  nlohmann::json val = {{"num_tokens", num_tokens},
                        {"shards", {{{"file", "val-00000.bin"}, {"num_tokens", num_tokens}}}}};
  if (mask_every > 0) {
    std::vector<int32_t> mask(tokens.size());
    for (size_t t = 0; t < mask.size(); ++t) mask[t] = t % mask_every == 0 ? 1 : 0;
    data::write_token_shard(dir / "val-00000.mask.bin", mask, 2);
    val["loss_mask_shards"] = {{{"file", "val-00000.mask.bin"}, {"num_tokens", num_tokens}}};
  }
  const nlohmann::json dataset = {
      {"format_version", 1},
      {"tokenizer", {{"kind", "byte"}, {"vocab_size", data::ByteTokenizer::kVocabSize}}},
      {"vocab_size", data::ByteTokenizer::kVocabSize},
      {"splits",
       {{"train", {{"num_tokens", 0}, {"shards", nlohmann::json::array()}}}, {"val", val}}}};
  data::testing::write_file(dir / data::kDatasetJsonName, dataset.dump());
}

// A forward pass that records the windows it saw (by their first token) and reports, per batch,
// the mean of the counted targets' values as its cross-entropy.
struct RecordingForward {
  std::vector<int64_t> windows_seen;
  std::vector<int64_t> batch_sizes;

  ForwardFn fn() {
    return [this](const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
      batch_sizes.push_back(batch);
      double sum = 0.0;
      int64_t counted = 0;
      for (int64_t row = 0; row < batch; ++row) {
        windows_seen.push_back(tokens[row * seq] / kSeqLen);
        for (int64_t t = 0; t < seq; ++t) {
          if (targets[row * seq + t] < 0) continue;
          sum += targets[row * seq + t];
          ++counted;
        }
      }
      LossBreakdown loss;
      loss.ce_loss = counted > 0 ? sum / static_cast<double>(counted) : 0.0;
      loss.loss = loss.ce_loss;
      loss.num_counted = counted;
      return loss;
    };
  }
};

// Rank `rank` of `size`, whose collectives are a single rank's (each rank's sums stay its own).
class PretendRank final : public ForwardingCommunicator {
 public:
  PretendRank(Communicator& inner, int rank, int size)
      : ForwardingCommunicator(inner), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }

 private:
  int rank_;
  int size_;
};

// Sum and count of the targets of windows `windows` (no mask): every target t of window w is
// w * kSeqLen + 1 ... w * kSeqLen + kSeqLen.
std::pair<double, int64_t> target_sums(const std::vector<int64_t>& windows) {
  double sum = 0.0;
  for (int64_t w : windows) {
    for (int64_t t = 1; t <= kSeqLen; ++t) sum += static_cast<double>(w * kSeqLen + t);
  }
  return {sum, static_cast<int64_t>(windows.size()) * kSeqLen};
}

class EvaluateTest : public ::testing::Test {
 protected:
  void SetUp() override { write_val_dataset(dir_.path()); }

  TempDir dir_;
  data::ByteTokenizer tokenizer_;
  SelfCommunicator self_;
};

TEST_F(EvaluateTest, ScoresEveryWindowInOrderWithoutALimit) {
  const data::TokenDataset dataset = data::TokenDataset::open(dir_.path(), "val");
  const data::Windows windows(dataset, kSeqLen, data::WindowLayout::kStream);
  ASSERT_EQ(windows.num_windows(), kNumWindows);
  RecordingForward forward;
  const EvalResult result = evaluate(forward.fn(), windows, tokenizer_, 3, 0, self_);
  std::vector<int64_t> all(kNumWindows);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(forward.windows_seen, all);
  EXPECT_EQ(forward.batch_sizes, (std::vector<int64_t>{3, 3, 3, 3, 3, 3, 2}));
  const auto [sum, count] = target_sums(all);
  EXPECT_EQ(result.num_tokens, count);
  EXPECT_NEAR(result.loss, sum / static_cast<double>(count), 1e-9);
  EXPECT_DOUBLE_EQ(result.perplexity, std::exp(result.loss));
  EXPECT_EQ(result.num_bytes, count);  // every target is a byte token
  EXPECT_EQ(count_scored_targets(windows, 3, 0), count);
}

TEST_F(EvaluateTest, AMaxBatchesLimitSpreadsTheScoredWindowsOverTheSplit) {
  const data::TokenDataset dataset = data::TokenDataset::open(dir_.path(), "val");
  const data::Windows windows(dataset, kSeqLen, data::WindowLayout::kStream);
  RecordingForward forward;
  // 2 batches of 3: windows floor(i * 20 / 6) for i = 0..5.
  const EvalResult result = evaluate(forward.fn(), windows, tokenizer_, 3, 2, self_);
  const std::vector<int64_t> expected = {0, 3, 6, 10, 13, 16};
  EXPECT_EQ(forward.windows_seen, expected);
  const auto [sum, count] = target_sums(expected);
  EXPECT_EQ(result.num_tokens, count);
  EXPECT_NEAR(result.loss, sum / static_cast<double>(count), 1e-9);
  EXPECT_EQ(count_scored_targets(windows, 3, 2), count);
}

TEST_F(EvaluateTest, ALimitAboveTheWindowCountScoresEveryWindowOnce) {
  const data::TokenDataset dataset = data::TokenDataset::open(dir_.path(), "val");
  const data::Windows windows(dataset, kSeqLen, data::WindowLayout::kStream);
  RecordingForward forward;
  evaluate(forward.fn(), windows, tokenizer_, 4, 100, self_);
  std::vector<int64_t> all(kNumWindows);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(forward.windows_seen, all);
}

TEST_F(EvaluateTest, RanksShareTheScoredWindowsAndTheirSumsAddUpToOneRanks) {
  const data::TokenDataset dataset = data::TokenDataset::open(dir_.path(), "val");
  const data::Windows windows(dataset, kSeqLen, data::WindowLayout::kStream);
  RecordingForward one_rank;
  const EvalResult whole = evaluate(one_rank.fn(), windows, tokenizer_, 2, 4, self_);
  ASSERT_EQ(one_rank.windows_seen.size(), 8u);

  constexpr int kRanks = 3;
  std::multiset<int64_t> seen;
  double nats = 0.0;
  int64_t tokens = 0;
  for (int rank = 0; rank < kRanks; ++rank) {
    PretendRank comm(self_, rank, kRanks);
    RecordingForward forward;
    // The sums stay this rank's: the real communicator would add them over the ranks.
    const EvalResult part = evaluate(forward.fn(), windows, tokenizer_, 2, 4, comm);
    seen.insert(forward.windows_seen.begin(), forward.windows_seen.end());
    nats += part.loss * static_cast<double>(part.num_tokens);
    tokens += part.num_tokens;
  }
  EXPECT_EQ(seen,
            std::multiset<int64_t>(one_rank.windows_seen.begin(), one_rank.windows_seen.end()));
  EXPECT_EQ(tokens, whole.num_tokens);
  EXPECT_NEAR(nats / static_cast<double>(tokens), whole.loss, 1e-9);
}

TEST(EvaluateMaskTest, CountsOnlyMaskedTargetsAndFailsWhenNoneIsScored) {
  TempDir dir;
  write_val_dataset(dir.path(), 40);  // targets 40, 80, 120, 160 count
  const data::TokenDataset dataset = data::TokenDataset::open(dir.path(), "val");
  const data::Windows windows(dataset, kSeqLen, data::WindowLayout::kStream);
  data::ByteTokenizer tokenizer;
  SelfCommunicator self;
  RecordingForward forward;
  const EvalResult all = evaluate(forward.fn(), windows, tokenizer, 5, 0, self);
  EXPECT_EQ(all.num_tokens, 4);
  EXPECT_EQ(all.num_bytes, 4);  // the bytes of the counted targets only
  EXPECT_NEAR(all.loss, (40.0 + 80.0 + 120.0 + 160.0) / 4.0, 1e-9);
  EXPECT_EQ(count_scored_targets(windows, 5, 0), 4);
  // One window, window 0 (targets 1..8): nothing counts.
  EXPECT_EQ(count_scored_targets(windows, 1, 1), 0);
  const std::string message =
      MF_ERROR_MESSAGE(evaluate(forward.fn(), windows, tokenizer, 1, 1, self));
  EXPECT_NE(message.find("the loss mask excludes them all"), std::string::npos) << message;
}

}  // namespace
}  // namespace moeforge
