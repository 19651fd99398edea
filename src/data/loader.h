// Reading a prepared dataset: TokenDataset (the concatenated token stream of one split, with its
// document boundaries) and BatchSampler (shuffled training windows with a resumable state, sliced
// across data-parallel ranks). How a split is cut into windows is windows.h.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "data/token_shard.h"

namespace moeforge::data {

class TokenDataset {
 public:
  // Reads dir/dataset.json and maps the shards of `split` ("train" or "val"). Checks each
  // shard's token count and vocab_size against dataset.json.
  static TokenDataset open(const std::filesystem::path& dir, const std::string& split);

  const std::filesystem::path& dir() const { return dir_; }
  const std::string& split() const { return split_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t vocab_size() const { return vocab_size_; }

  // out[0:count] = stream tokens [begin, begin + count); the range must lie in the stream.
  void read(int64_t begin, int64_t count, int32_t* out) const;

  // Whether the split has a loss mask (prepare.h: completion-only loss).
  bool has_loss_mask() const { return !mask_shards_.empty(); }
  // out[0:count] = whether stream tokens [begin, begin + count) count as targets (1, or 0 where
  // the loss mask excludes them; all 1 without a mask).
  void read_loss_mask(int64_t begin, int64_t count, int32_t* out) const;

  // The stream offset of each document's first token, in stream order, from dataset.json's
  // document list; a document cut by the stream_tail split rule counts in both splits (its end
  // in val starts there). nullopt: dataset.json has no document list.
  const std::optional<std::vector<int64_t>>& document_starts() const { return document_starts_; }
  // The tokenizer's EOS id from dataset.json (nullopt: not recorded).
  std::optional<int64_t> eos_id() const { return eos_id_; }

 private:
  // Throws unless [begin, begin + count) lies in the stream.
  void check_range(int64_t begin, int64_t count) const;
  // read() over token shards or mask shards (the same boundaries).
  void read_from(const std::vector<TokenShard>& shards, int64_t begin, int64_t count,
                 int32_t* out) const;

  std::filesystem::path dir_;
  std::string split_;
  int64_t vocab_size_ = 0;
  int64_t num_tokens_ = 0;
  std::vector<TokenShard> shards_;
  std::vector<TokenShard> mask_shards_;  // [num_shards] or empty: no loss mask
  std::vector<int64_t> shard_begins_;    // [num_shards], stream offset of each shard's first token
  std::optional<std::vector<int64_t>> document_starts_;
  std::optional<int64_t> eos_id_;
};

class Windows;

// Where a BatchSampler is: `position` windows of epoch `epoch` have been consumed.
struct LoaderState {
  uint64_t epoch = 0;
  uint64_t position = 0;

  bool operator==(const LoaderState&) const = default;
};

// {"epoch": e, "position": p}; from_json names the missing or mistyped field.
void to_json(nlohmann::json& j, const LoaderState& state);
void from_json(const nlohmann::json& j, LoaderState& state);

// Training batches: each epoch visits every window once, in a permutation that depends only on
// (seed, epoch) (Fisher-Yates driven by moeforge::Rng). The windows must outlive the sampler.
class BatchSampler {
 public:
  BatchSampler(const Windows& windows, uint64_t seed);

  int64_t seq_len() const;
  int64_t num_windows() const;
  uint64_t seed() const { return seed_; }

  LoaderState state() const { return state_; }
  // Resumes at `state`; its position must be < num_windows.
  void set_state(const LoaderState& state);

  // inputs, targets: [batch_size, seq_len]. Rows come from consecutive windows of the epoch
  // order, continuing into the next epoch when one ends.
  void next_batch(int64_t batch_size, int32_t* inputs, int32_t* targets);
  // Data parallelism: consumes num_ranks * batch_size windows (one global batch) and fills rows
  // rank * batch_size .. (rank + 1) * batch_size - 1 of it. num_ranks == 1 is next_batch.
  void next_batch_for_rank(int64_t batch_size, int rank, int num_ranks, int32_t* inputs,
                           int32_t* targets);
  // Advances by `count` windows without reading them.
  void skip(int64_t count);

  // The window order of `epoch`: a permutation of [0, num_windows).
  std::vector<int64_t> epoch_order(uint64_t epoch) const;

 private:
  const Windows* windows_;
  uint64_t seed_;
  LoaderState state_;
  uint64_t order_epoch_ = 0;    // the epoch whose order is in order_
  std::vector<int64_t> order_;  // [num_windows]
};

}  // namespace moeforge::data
