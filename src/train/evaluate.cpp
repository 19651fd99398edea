// Ordered, rank-split evaluation over the validation windows (all, or an evenly spread subset).
#include "train/evaluate.h"

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "core/error.h"

namespace moeforge {
namespace {

// How many windows evaluate() scores.
int64_t num_scored_windows(const data::Windows& windows, int64_t batch_size, int64_t max_batches) {
  const int64_t num_windows = windows.num_windows();
  MF_CHECK(num_windows > 0, "the validation split has no window ({}); cannot evaluate",
           windows.one_window_needs());
  return max_batches > 0 ? std::min(num_windows, max_batches * batch_size) : num_windows;
}

// The window of the i-th of num_scored: spread evenly over the split, so that a split written in
// blocks (data synth writes its tasks one after another) is scored from every block, not only the
// first.
int64_t scored_window(const data::Windows& windows, int64_t i, int64_t num_scored) {
  return static_cast<int64_t>(static_cast<__int128>(i) * windows.num_windows() / num_scored);
}

}  // namespace

int64_t count_scored_targets(const data::Windows& windows, int64_t batch_size,
                             int64_t max_batches) {
  const int64_t num_windows = num_scored_windows(windows, batch_size, max_batches);
  std::vector<int32_t> inputs(windows.seq_len()), targets(windows.seq_len());
  int64_t counted = 0;
  for (int64_t i = 0; i < num_windows; ++i) {
    windows.read(scored_window(windows, i, num_windows), inputs.data(), targets.data());
    for (const int32_t t : targets) counted += t >= 0;
  }
  return counted;
}

EvalResult evaluate(Transformer<float>& model, const data::Windows& windows,
                    const data::Tokenizer& tokenizer, int64_t batch_size, int64_t max_batches,
                    Communicator& dp) {
  const ForwardFn forward = [&model](const int32_t* tokens, const int32_t* targets, int64_t batch,
                                     int64_t seq) {
    return model.forward(tokens, targets, batch, seq);
  };
  return evaluate(forward, windows, tokenizer, batch_size, max_batches, dp);
}

EvalResult evaluate(const ForwardFn& forward, const data::Windows& windows,
                    const data::Tokenizer& tokenizer, int64_t batch_size, int64_t max_batches,
                    Communicator& dp) {
  const int64_t num_windows = num_scored_windows(windows, batch_size, max_batches);
  const int64_t seq_len = windows.seq_len();

  // Bytes of text per token id (special ids have none).
  std::vector<int64_t> token_bytes(static_cast<size_t>(tokenizer.vocab_size()));
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    token_bytes[id] =
        static_cast<int64_t>(tokenizer.decode(std::span<const int32_t>(&id, 1)).size());
  }

  std::vector<int32_t> inputs(batch_size * seq_len), targets(batch_size * seq_len);
  double sums[3] = {0.0, 0.0, 0.0};  // nats, tokens, bytes
  for (int64_t first = dp.rank() * batch_size; first < num_windows;
       first += dp.size() * batch_size) {
    const int64_t rows = std::min(batch_size, num_windows - first);
    for (int64_t r = 0; r < rows; ++r) {
      windows.read(scored_window(windows, first + r, num_windows), inputs.data() + r * seq_len,
                   targets.data() + r * seq_len);
    }
    const LossBreakdown loss = forward(inputs.data(), targets.data(), rows, seq_len);
    sums[0] += loss.ce_loss * static_cast<double>(loss.num_counted);
    sums[1] += static_cast<double>(loss.num_counted);
    for (int64_t i = 0; i < rows * seq_len; ++i) {
      if (targets[i] >= 0 && targets[i] < tokenizer.vocab_size())
        sums[2] += token_bytes[targets[i]];
    }
  }
  dp.all_reduce_sum(sums, 3);
  MF_CHECK(sums[1] > 0,
           "no target of the {} validation windows scored (of {} tokens) counts in the loss: the "
           "loss mask excludes them all; score more windows (max batches) or longer ones",
           num_windows, seq_len);
  EvalResult result;
  result.num_tokens = static_cast<int64_t>(sums[1]);
  result.num_bytes = static_cast<int64_t>(sums[2]);
  result.loss = sums[1] > 0 ? sums[0] / sums[1] : 0.0;
  result.perplexity = std::exp(result.loss);
  result.bits_per_byte = sums[2] > 0 ? sums[0] / std::log(2.0) / sums[2] : 0.0;
  return result;
}

double unigram_baseline_loss(const data::TokenDataset& train, const data::TokenDataset& eval) {
  const int64_t vocab = std::max(train.vocab_size(), eval.vocab_size());
  std::vector<double> counts(static_cast<size_t>(vocab), 1.0);
  constexpr int64_t kChunk = 1 << 20;
  std::vector<int32_t> buffer(kChunk), mask(kChunk);
  double num_fitted = 0.0;
  for (int64_t begin = 0; begin < train.num_tokens(); begin += kChunk) {
    const int64_t count = std::min(kChunk, train.num_tokens() - begin);
    train.read(begin, count, buffer.data());
    train.read_loss_mask(begin, count, mask.data());
    for (int64_t i = 0; i < count; ++i) {
      counts[buffer[i]] += mask[i];
      num_fitted += mask[i];
    }
  }
  const double total = num_fitted + static_cast<double>(vocab);
  double nats = 0.0;
  int64_t num_counted = 0;
  for (int64_t begin = 1; begin < eval.num_tokens(); begin += kChunk) {
    const int64_t count = std::min(kChunk, eval.num_tokens() - begin);
    eval.read(begin, count, buffer.data());
    eval.read_loss_mask(begin, count, mask.data());
    for (int64_t i = 0; i < count; ++i) {
      if (mask[i] == 0) continue;
      nats -= std::log(counts[buffer[i]] / total);
      ++num_counted;
    }
  }
  MF_CHECK(num_counted > 0, "the evaluation split has no tokens to score");
  return nats / static_cast<double>(num_counted);
}

}  // namespace moeforge
