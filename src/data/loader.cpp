// TokenDataset (shards of one split as one stream) and BatchSampler (shuffled windows).
#include "data/loader.h"

#include "core/error.h"
#include "core/rng.h"
#include "data/file_util.h"
#include "data/prepare.h"
#include "data/windows.h"

#include <algorithm>
#include <numeric>
#include <utility>

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

// Mixed into the seed so the loader's stream differs from other users of the same seed.
constexpr uint64_t kSamplerSeedSalt = 0x6c6f616465720001ull;
// Epoch e draws from counters [e << 40, (e + 1) << 40), so epochs never share random numbers.
constexpr int kEpochCounterShift = 40;

// The stream offsets of split's documents from dataset.json's document list (prepare.cpp writes
// each document's split, "train", "val" or "train+val" for the one the stream_tail rule cuts, and
// token count, in stream order). Throws unless they add up to the split's token count.
std::vector<int64_t> split_document_starts(const nlohmann::json& j, const std::string& split,
                                           const fs::path& file) {
  const nlohmann::json& documents = j.at("documents");
  MF_CHECK(documents.is_array(), "{}: field 'documents' must be an array", file.string());
  const nlohmann::json& splits = json_field(j, "splits", file);
  const int64_t train_tokens =
      json_int_field(json_field(splits, "train", file), "num_tokens", file);
  const int64_t split_tokens = json_int_field(json_field(splits, split, file), "num_tokens", file);
  std::vector<int64_t> starts;
  int64_t train_pos = 0, val_pos = 0;
  for (const nlohmann::json& document : documents) {
    const std::string doc_split = json_string_field(document, "split", file);
    const int64_t num_tokens = json_int_field(document, "num_tokens", file);
    MF_CHECK(num_tokens >= 1, "{}: a document of the document list holds {} tokens", file.string(),
             num_tokens);
    int64_t num_train = 0;
    if (doc_split == "train") {
      num_train = num_tokens;
    } else if (doc_split == "train+val") {
      num_train = train_tokens - train_pos;
      MF_CHECK(num_train > 0 && num_train < num_tokens,
               "{}: the document cut between train and val holds {} tokens, but {} train tokens "
               "are left for it",
               file.string(), num_tokens, num_train);
    } else {
      MF_CHECK(doc_split == "val", "{}: a document's split is \"{}\" (train, val or train+val)",
               file.string(), doc_split);
    }
    if (split == "train" && num_train > 0) starts.push_back(train_pos);
    if (split == "val" && num_train < num_tokens) starts.push_back(val_pos);
    train_pos += num_train;
    val_pos += num_tokens - num_train;
  }
  const int64_t listed = split == "train" ? train_pos : val_pos;
  MF_CHECK(listed == split_tokens,
           "{}: the document list gives split '{}' {} tokens, but its shards hold {}",
           file.string(), split, listed, split_tokens);
  return starts;
}

}  // namespace

TokenDataset TokenDataset::open(const fs::path& dir, const std::string& split) {
  MF_CHECK(split == "train" || split == "val",
           "dataset split '{}' is unknown; use 'train' or 'val'", split);
  const fs::path file = dir / kDatasetJsonName;
  const nlohmann::json j = read_json_file(file);
  json_format_version(j, kDatasetFormatVersion, file);

  TokenDataset dataset;
  dataset.dir_ = dir;
  dataset.split_ = split;
  dataset.vocab_size_ = json_int_field(j, "vocab_size", file);
  MF_CHECK(dataset.vocab_size_ >= 1, "{}: field 'vocab_size' is {}, must be >= 1", file.string(),
           dataset.vocab_size_);
  const nlohmann::json& split_json = json_field(json_field(j, "splits", file), split, file);
  const nlohmann::json& shards_json = json_field(split_json, "shards", file);
  MF_CHECK(shards_json.is_array(), "{}: field 'splits.{}.shards' must be an array", file.string(),
           split);
  for (const nlohmann::json& shard_json : shards_json) {
    const std::string name = json_string_field(shard_json, "file", file);
    const int64_t listed_tokens = json_int_field(shard_json, "num_tokens", file);
    TokenShard shard = TokenShard::open(dir / name);
    MF_CHECK(shard.num_tokens() == listed_tokens,
             "{}: shard '{}' holds {} tokens but dataset.json lists {}", file.string(), name,
             shard.num_tokens(), listed_tokens);
    MF_CHECK(shard.vocab_size() == dataset.vocab_size_,
             "{}: shard '{}' has vocab_size {} but dataset.json says {}", file.string(), name,
             shard.vocab_size(), dataset.vocab_size_);
    dataset.shard_begins_.push_back(dataset.num_tokens_);
    dataset.num_tokens_ += shard.num_tokens();
    dataset.shards_.push_back(std::move(shard));
  }
  const int64_t listed_total = json_int_field(split_json, "num_tokens", file);
  MF_CHECK(listed_total == dataset.num_tokens_,
           "{}: field 'splits.{}.num_tokens' is {} but its shards hold {} tokens", file.string(),
           split, listed_total, dataset.num_tokens_);
  if (split_json.contains("loss_mask_shards")) {
    const nlohmann::json& masks_json = split_json.at("loss_mask_shards");
    MF_CHECK(masks_json.is_array() && masks_json.size() == dataset.shards_.size(),
             "{}: field 'splits.{}.loss_mask_shards' must list one mask per shard ({})",
             file.string(), split, dataset.shards_.size());
    for (size_t shard_idx = 0; shard_idx < dataset.shards_.size(); ++shard_idx) {
      const std::string name = json_string_field(masks_json[shard_idx], "file", file);
      const int64_t listed = json_int_field(masks_json[shard_idx], "num_tokens", file);
      TokenShard mask = TokenShard::open(dir / name);
      MF_CHECK(mask.num_tokens() == listed,
               "{}: loss mask '{}' holds {} values but dataset.json lists {}", file.string(), name,
               mask.num_tokens(), listed);
      MF_CHECK(
          mask.vocab_size() == 2 && mask.num_tokens() == dataset.shards_[shard_idx].num_tokens(),
          "{}: loss mask '{}' holds {} values of vocab {}, but its shard has {} tokens and a "
          "mask has vocab 2",
          file.string(), name, mask.num_tokens(), mask.vocab_size(),
          dataset.shards_[shard_idx].num_tokens());
      dataset.mask_shards_.push_back(std::move(mask));
    }
  }
  if (j.contains("tokenizer") && j.at("tokenizer").is_object() &&
      j.at("tokenizer").contains("eos_id")) {
    dataset.eos_id_ = json_int_field(j.at("tokenizer"), "eos_id", file);
  }
  if (j.contains("documents")) {
    dataset.document_starts_ = split_document_starts(j, split, file);
    const std::vector<int64_t>& starts = *dataset.document_starts_;
    MF_CHECK(starts.empty() == (dataset.num_tokens_ == 0),
             "{}: the document list puts {} documents in split '{}' of {} tokens", file.string(),
             starts.size(), split, dataset.num_tokens_);
  }
  return dataset;
}

void TokenDataset::read(int64_t begin, int64_t count, int32_t* out) const {
  read_from(shards_, begin, count, out);
}

void TokenDataset::check_range(int64_t begin, int64_t count) const {
  MF_CHECK(begin >= 0 && count >= 0 && begin <= num_tokens_ && count <= num_tokens_ - begin,
           "dataset '{}' split '{}': range [{}, {}) is outside its {} tokens", dir_.string(),
           split_, begin, begin + count, num_tokens_);
}

void TokenDataset::read_loss_mask(int64_t begin, int64_t count, int32_t* out) const {
  if (mask_shards_.empty()) {
    check_range(begin, count);
    std::fill(out, out + count, 1);
    return;
  }
  read_from(mask_shards_, begin, count, out);
}

void TokenDataset::read_from(const std::vector<TokenShard>& shards, int64_t begin, int64_t count,
                             int32_t* out) const {
  check_range(begin, count);
  if (count == 0) return;
  // The last shard starting at or before `begin`.
  auto shard_idx =
      static_cast<size_t>(std::upper_bound(shard_begins_.begin(), shard_begins_.end(), begin) -
                          shard_begins_.begin() - 1);
  while (count > 0) {
    const TokenShard& shard = shards[shard_idx];
    const int64_t offset = begin - shard_begins_[shard_idx];
    const int64_t take = std::min(count, shard.num_tokens() - offset);
    shard.read(offset, take, out);
    out += take;
    begin += take;
    count -= take;
    ++shard_idx;
  }
}

void to_json(nlohmann::json& j, const LoaderState& state) {
  j = {{"epoch", state.epoch}, {"position", state.position}};
}

void from_json(const nlohmann::json& j, LoaderState& state) {
  MF_CHECK(j.is_object(), "loader state must be a JSON object (got {})", j.dump());
  for (const char* field : {"epoch", "position"}) {
    MF_CHECK(j.contains(field) && j.at(field).is_number_integer() && j.at(field) >= 0,
             "loader state: field '{}' is missing or not a non-negative integer (got {})", field,
             j.dump());
  }
  state.epoch = j.at("epoch").get<uint64_t>();
  state.position = j.at("position").get<uint64_t>();
}

BatchSampler::BatchSampler(const Windows& windows, uint64_t seed)
    : windows_(&windows), seed_(seed) {
  const TokenDataset& dataset = windows.dataset();
  MF_CHECK(num_windows() >= 1, "dataset '{}' split '{}' has {} tokens, too few for one window: {}",
           dataset.dir().string(), dataset.split(), dataset.num_tokens(),
           windows.one_window_needs());
  MF_CHECK(num_windows() < (int64_t{1} << kEpochCounterShift),
           "batch sampler: {} windows is too many", num_windows());
  order_ = epoch_order(0);
}

int64_t BatchSampler::seq_len() const {
  return windows_->seq_len();
}

int64_t BatchSampler::num_windows() const {
  return windows_->num_windows();
}

std::vector<int64_t> BatchSampler::epoch_order(uint64_t epoch) const {
  std::vector<int64_t> order(static_cast<size_t>(num_windows()));
  std::iota(order.begin(), order.end(), int64_t{0});
  Rng rng(seed_ ^ kSamplerSeedSalt, epoch << kEpochCounterShift);
  for (int64_t window_idx = num_windows() - 1; window_idx > 0; --window_idx) {
    auto other_idx = static_cast<int64_t>(rng.below(static_cast<uint64_t>(window_idx) + 1));
    std::swap(order[window_idx], order[other_idx]);
  }
  return order;
}

void BatchSampler::set_state(const LoaderState& state) {
  MF_CHECK(state.position < static_cast<uint64_t>(num_windows()),
           "loader state position {} is not inside an epoch of {} windows (was the dataset or "
           "seq_len changed since the state was saved?)",
           state.position, num_windows());
  state_ = state;
}

void BatchSampler::skip(int64_t count) {
  MF_CHECK(count >= 0, "batch sampler: cannot skip {} windows", count);
  const uint64_t total = state_.position + static_cast<uint64_t>(count);
  state_.epoch += total / static_cast<uint64_t>(num_windows());
  state_.position = total % static_cast<uint64_t>(num_windows());
}

void BatchSampler::next_batch(int64_t batch_size, int32_t* inputs, int32_t* targets) {
  MF_CHECK(batch_size >= 1, "batch sampler: batch_size {} must be >= 1", batch_size);
  MF_CHECK(inputs != nullptr && targets != nullptr, "batch sampler: null output buffer");
  for (int64_t row_idx = 0; row_idx < batch_size; ++row_idx) {
    if (order_epoch_ != state_.epoch) {
      order_ = epoch_order(state_.epoch);
      order_epoch_ = state_.epoch;
    }
    windows_->read(order_[state_.position], inputs + row_idx * seq_len(),
                   targets + row_idx * seq_len());
    skip(1);
  }
}

void BatchSampler::next_batch_for_rank(int64_t batch_size, int rank, int num_ranks, int32_t* inputs,
                                       int32_t* targets) {
  MF_CHECK(num_ranks >= 1 && rank >= 0 && rank < num_ranks,
           "batch sampler: rank {} is not in [0, num_ranks {})", rank, num_ranks);
  MF_CHECK(batch_size >= 1, "batch sampler: batch_size {} must be >= 1", batch_size);
  skip(rank * batch_size);
  next_batch(batch_size, inputs, targets);
  skip((num_ranks - 1 - rank) * batch_size);
}

}  // namespace moeforge::data
