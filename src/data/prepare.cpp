// prepare_dataset: finds the documents, trains or picks the tokenizer, splits train/val,
// writes the shards and dataset.json into a staging folder and publishes it by rename.
#include "data/prepare.h"

#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/file_util.h"
#include "data/sentencepiece_tokenizer.h"
#include "data/token_shard.h"
#include "io/atomic_file.h"

#include <fmt/ranges.h>
#include <fnmatch.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <span>
#include <utility>

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kSplitHashBuckets = 10000;

bool matches_any(const std::vector<std::string>& globs, const std::string& relative_path) {
  const std::string name = fs::path(relative_path).filename().string();
  for (const std::string& glob : globs) {
    if (::fnmatch(glob.c_str(), name.c_str(), 0) == 0 ||
        ::fnmatch(glob.c_str(), relative_path.c_str(), 0) == 0) {
      return true;
    }
  }
  return false;
}

bool is_hidden(const fs::path& path) {
  const std::string name = path.filename().string();
  return !name.empty() && name[0] == '.';
}

bool is_inside(const fs::path& path, const fs::path& folder) {
  auto path_it = path.begin();
  for (const fs::path& part : folder) {
    if (path_it == path.end() || *path_it != part) return false;
    ++path_it;
  }
  return true;
}

// The regular files under `input` (or `input` itself) with their paths relative to it, sorted.
std::vector<InputDocument> list_input(const fs::path& input) {
  MF_CHECK(fs::exists(input), "prepare: input '{}' not found", input.string());
  std::vector<InputDocument> found;
  if (!fs::is_directory(input)) {
    MF_CHECK(fs::is_regular_file(input), "prepare: input '{}' is neither a file nor a folder",
             input.string());
    found.push_back({input, input.filename().generic_string()});
    return found;
  }
  try {
    for (auto it = fs::recursive_directory_iterator(input);
         it != fs::recursive_directory_iterator(); ++it) {
      if (is_hidden(it->path())) {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      if (!it->is_regular_file()) continue;
      found.push_back({it->path(), it->path().lexically_relative(input).generic_string()});
    }
  } catch (const fs::filesystem_error& e) {
    MF_FAIL("prepare: cannot walk input folder '{}': {}", input.string(), e.what());
  }
  std::sort(found.begin(), found.end(), [](const InputDocument& a, const InputDocument& b) {
    return a.relative_path < b.relative_path;
  });
  return found;
}

void validate_options(const PrepareOptions& options) {
  MF_CHECK(options.tokenizer == "byte" || options.tokenizer == "sentencepiece",
           "prepare: tokenizer '{}' is unknown; use 'byte' or 'sentencepiece'", options.tokenizer);
  MF_CHECK(options.val_fraction >= 0.0 && options.val_fraction <= 0.5,
           "prepare: val_fraction {} must be in [0, 0.5]", options.val_fraction);
  MF_CHECK(options.shard_tokens >= 1 &&
               options.shard_tokens <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
           "prepare: shard_tokens {} must be >= 1", options.shard_tokens);
  if (options.tokenizer == "sentencepiece") {
    MF_CHECK(options.sp_vocab_size > 259,
             "prepare: sp_vocab_size {} must be > 259; the model needs unk, BOS, EOS, 256 byte "
             "pieces and the characters of the text",
             options.sp_vocab_size);
  }
}

struct OutputPaths {
  fs::path target;    // out_dir, absolute
  fs::path staging;   // built here, then renamed to target
  fs::path replaced;  // the previous target while it is swapped out (overwrite)
};

OutputPaths output_paths(const fs::path& out_dir) {
  MF_CHECK(!out_dir.empty(), "prepare: out_dir is empty; name the folder to write the dataset to");
  fs::path target = fs::absolute(out_dir).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();
  MF_CHECK(target.has_filename() && target != target.root_path(),
           "prepare: out_dir '{}' does not name a folder", out_dir.string());
  const std::string name = target.filename().string();
  return {target, target.parent_path() / ("." + name + ".staging"),
          target.parent_path() / ("." + name + ".replaced")};
}

// Removes the staging folder unless the dataset was published.
class StagingGuard {
 public:
  explicit StagingGuard(fs::path dir) : dir_(std::move(dir)) {}
  ~StagingGuard() {
    if (!dir_.empty()) {
      std::error_code ignored;
      fs::remove_all(dir_, ignored);
    }
  }
  StagingGuard(const StagingGuard&) = delete;
  StagingGuard& operator=(const StagingGuard&) = delete;
  void release() { dir_.clear(); }

 private:
  fs::path dir_;
};

// The token stream of one split, cut into shards of shard_tokens tokens as it grows; with a loss
// mask, beside each shard a mask shard of the same length (vocab 2: 1 where the token counts as a
// target).
class SplitWriter {
 public:
  SplitWriter(fs::path dir, std::string split, uint64_t shard_tokens, int64_t vocab_size,
              bool with_mask)
      : dir_(std::move(dir)),
        split_(std::move(split)),
        shard_tokens_(shard_tokens),
        vocab_size_(vocab_size),
        with_mask_(with_mask) {}

  // mask: [tokens.size()] when the writer has a loss mask, else empty.
  void append(std::span<const int32_t> tokens, std::span<const int32_t> mask) {
    num_tokens_ += static_cast<int64_t>(tokens.size());
    while (!tokens.empty()) {
      size_t take = std::min<size_t>(shard_tokens_ - buffer_.size(), tokens.size());
      buffer_.insert(buffer_.end(), tokens.begin(), tokens.begin() + take);
      tokens = tokens.subspan(take);
      if (with_mask_) {
        mask_buffer_.insert(mask_buffer_.end(), mask.begin(), mask.begin() + take);
        mask = mask.subspan(take);
      }
      if (buffer_.size() == shard_tokens_) flush();
    }
  }
  void finish() {
    if (!buffer_.empty()) flush();
  }

  int64_t num_tokens() const { return num_tokens_; }
  const std::vector<std::string>& shard_names() const { return shard_names_; }
  int64_t num_documents = 0;

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json shards = nlohmann::ordered_json::array();
    for (size_t shard_idx = 0; shard_idx < shard_names_.size(); ++shard_idx) {
      shards.push_back(
          {{"file", shard_names_[shard_idx]}, {"num_tokens", shard_num_tokens_[shard_idx]}});
    }
    nlohmann::ordered_json out = {
        {"num_tokens", num_tokens_}, {"num_documents", num_documents}, {"shards", shards}};
    if (with_mask_) {
      nlohmann::ordered_json& masks = out["loss_mask_shards"] = nlohmann::ordered_json::array();
      for (size_t shard_idx = 0; shard_idx < shard_names_.size(); ++shard_idx) {
        masks.push_back(
            {{"file", mask_name(shard_idx)}, {"num_tokens", shard_num_tokens_[shard_idx]}});
      }
    }
    return out;
  }

 private:
  std::string mask_name(size_t shard_idx) const {
    return fmt::format("{}-{:05d}.mask.bin", split_, shard_idx);
  }
  void flush() {
    std::string name = fmt::format("{}-{:05d}.bin", split_, shard_names_.size());
    write_token_shard(dir_ / name, buffer_, vocab_size_);
    if (with_mask_) {
      write_token_shard(dir_ / mask_name(shard_names_.size()), mask_buffer_, 2);
      mask_buffer_.clear();
    }
    shard_names_.push_back(name);
    shard_num_tokens_.push_back(static_cast<int64_t>(buffer_.size()));
    buffer_.clear();
  }

  fs::path dir_;
  std::string split_;
  uint64_t shard_tokens_;
  int64_t vocab_size_;
  bool with_mask_;
  std::vector<int32_t> buffer_;       // [< shard_tokens], the shard being filled
  std::vector<int32_t> mask_buffer_;  // its loss mask
  int64_t num_tokens_ = 0;
  std::vector<std::string> shard_names_;
  std::vector<int64_t> shard_num_tokens_;
};

std::string val_rule_description(const std::string& val_rule, double val_fraction) {
  if (val_rule == "document_hash") {
    return fmt::format("a document is val when fnv1a64(relative_path + '\\0' + content) % {} < {}",
                       kSplitHashBuckets, std::llround(val_fraction * kSplitHashBuckets));
  }
  if (val_rule == "stream_tail") {
    return fmt::format(
        "the hash rule left a split without documents; the last floor({} * num_tokens) tokens "
        "of the document stream are val",
        val_fraction);
  }
  return "val_fraction is 0; every document is train";
}

// Replaces `paths.target` by the staging folder; on failure the previous target is put back.
void publish(const OutputPaths& paths) {
  io::fsync_directory(paths.staging);
  bool replaced = false;
  try {
    if (fs::exists(paths.target)) {
      if (fs::is_empty(paths.target)) {
        fs::remove(paths.target);
      } else {
        fs::remove_all(paths.replaced);
        fs::rename(paths.target, paths.replaced);
        replaced = true;
      }
    }
    fs::rename(paths.staging, paths.target);
  } catch (const fs::filesystem_error& e) {
    if (replaced) {
      std::error_code ignored;
      fs::rename(paths.replaced, paths.target, ignored);
    }
    MF_FAIL("prepare: cannot move the finished dataset from '{}' to '{}': {}",
            paths.staging.string(), paths.target.string(), e.what());
  }
  io::fsync_directory(paths.target.parent_path());
  if (replaced) fs::remove_all(paths.replaced);
}

}  // namespace

uint64_t document_split_hash(std::string_view relative_path, std::string_view content) {
  uint64_t hash = 0xcbf29ce484222325ull;
  auto mix = [&hash](std::string_view bytes) {
    for (char byte : bytes) {
      hash ^= static_cast<unsigned char>(byte);
      hash *= 0x100000001b3ull;
    }
  };
  mix(relative_path);
  mix(std::string_view("\0", 1));
  mix(content);
  return hash;
}

bool hash_selects_val(uint64_t split_hash, double val_fraction) {
  const auto threshold = static_cast<uint64_t>(std::llround(val_fraction * kSplitHashBuckets));
  return split_hash % kSplitHashBuckets < threshold;
}

std::vector<InputDocument> collect_input_documents(const PrepareOptions& options) {
  MF_CHECK(!options.inputs.empty(), "prepare: no inputs given");
  fs::path out_dir;
  if (!options.out_dir.empty())
    out_dir = fs::weakly_canonical(output_paths(options.out_dir).target);
  std::set<fs::path> seen;  // canonical paths
  std::vector<InputDocument> documents;
  for (const fs::path& input : options.inputs) {
    for (InputDocument& document : list_input(input)) {
      if (!options.include_globs.empty() &&
          !matches_any(options.include_globs, document.relative_path)) {
        continue;
      }
      if (matches_any(options.exclude_globs, document.relative_path)) continue;
      fs::path canonical = fs::canonical(document.path);
      if (!out_dir.empty() && is_inside(canonical, out_dir)) continue;
      if (!seen.insert(canonical).second) continue;
      documents.push_back(std::move(document));
    }
  }
  if (documents.empty()) {
    std::vector<std::string> searched;
    for (const fs::path& input : options.inputs) searched.push_back(input.string());
    MF_FAIL(
        "prepare: no input files found in [{}] (include_globs [{}], exclude_globs [{}]; "
        "hidden files are skipped)",
        fmt::join(searched, ", "), fmt::join(options.include_globs, ", "),
        fmt::join(options.exclude_globs, ", "));
  }
  return documents;
}

PrepareSummary prepare_dataset(const PrepareOptions& options, const PrepareProgressFn& progress) {
  validate_options(options);
  const OutputPaths paths = output_paths(options.out_dir);
  if (fs::exists(paths.target)) {
    MF_CHECK(fs::is_directory(paths.target), "prepare: out_dir '{}' exists and is not a folder",
             options.out_dir.string());
    MF_CHECK(options.overwrite || fs::is_empty(paths.target),
             "prepare: out_dir '{}' exists and is not empty; choose another folder or pass "
             "overwrite (--overwrite) to replace it",
             options.out_dir.string());
  }
  auto report = [&progress](const char* stage, int64_t num_done, int64_t num_documents,
                            int64_t num_tokens) {
    if (progress) progress({stage, num_done, num_documents, num_tokens});
  };

  const std::vector<InputDocument> documents = collect_input_documents(options);
  const auto num_documents = static_cast<int64_t>(documents.size());

  std::vector<char> hash_is_val(documents.size(), 0);
  int64_t num_hash_val = 0;
  for (int64_t doc_idx = 0; doc_idx < num_documents; ++doc_idx) {
    const InputDocument& document = documents[doc_idx];
    uint64_t split_hash =
        document_split_hash(document.relative_path, read_file_bytes(document.path));
    hash_is_val[doc_idx] = hash_selects_val(split_hash, options.val_fraction) ? 1 : 0;
    num_hash_val += hash_is_val[doc_idx];
    report("scan", doc_idx + 1, num_documents, 0);
  }
  std::string val_rule = "document_hash";
  if (options.val_fraction == 0.0) {
    val_rule = "none";
  } else if (num_hash_val == 0 || num_hash_val == num_documents) {
    val_rule = "stream_tail";
  }
  if (val_rule != "document_hash") std::fill(hash_is_val.begin(), hash_is_val.end(), 0);

  std::error_code ignored;
  fs::remove_all(paths.staging, ignored);
  fs::create_directories(paths.staging);
  StagingGuard staging_guard(paths.staging);

  std::unique_ptr<Tokenizer> tokenizer;
  if (options.tokenizer == "byte") {
    tokenizer = std::make_unique<ByteTokenizer>();
  } else {
    std::vector<fs::path> train_files;
    for (int64_t doc_idx = 0; doc_idx < num_documents; ++doc_idx) {
      if (!hash_is_val[doc_idx]) train_files.push_back(documents[doc_idx].path);
    }
    report("train_tokenizer", 0, num_documents, 0);
    train_sentencepiece(train_files, paths.staging / "tokenizer", options.sp_vocab_size);
    tokenizer = SentencePieceTokenizer::from_model_file(paths.staging / kSentencePieceModelName);
  }
  tokenizer->save(paths.staging);

  // A document's tokens and, with completion_spans, its loss mask (1: counted as a target).
  struct Encoded {
    std::vector<int32_t> tokens, mask;
  };
  const bool with_mask = static_cast<bool>(options.completion_spans);
  auto encode_document = [&tokenizer, &options, with_mask](const InputDocument& document) {
    const std::string text = read_file_bytes(document.path);
    const std::string_view view(text);
    Encoded out{{tokenizer->bos_id()}, {}};
    if (with_mask) out.mask.push_back(0);
    auto append = [&](size_t begin, size_t end, int32_t counted) {
      if (begin == end) return;
      const std::vector<int32_t> piece = tokenizer->encode(view.substr(begin, end - begin));
      out.tokens.insert(out.tokens.end(), piece.begin(), piece.end());
      if (with_mask) out.mask.insert(out.mask.end(), piece.size(), counted);
    };
    size_t done = 0;  // bytes encoded so far
    if (with_mask) {
      for (CompletionSpan span : options.completion_spans(document)) {
        MF_CHECK(span.begin <= text.size(),
                 "prepare: the completion of '{}' starts at byte {}, past its {} bytes",
                 document.relative_path, span.begin, text.size());
        if (span.end == std::string::npos) span.end = text.size();
        MF_CHECK(span.end <= text.size(),
                 "prepare: the completion of '{}' ends at byte {}, past its {} bytes",
                 document.relative_path, span.end, text.size());
        MF_CHECK(span.begin >= done && span.end >= span.begin,
                 "prepare: the completions of '{}' overlap or are out of order (bytes [{}, {}) "
                 "after byte {})",
                 document.relative_path, span.begin, span.end, done);
        append(done, span.begin, 0);
        append(span.begin, span.end, 1);
        done = span.end;
      }
    }
    append(done, text.size(), 0);
    out.tokens.push_back(tokenizer->eos_id());
    if (with_mask) out.mask.push_back(1);
    return out;
  };

  // stream_tail: tokens [train_stream_end, total) of the document stream are val.
  int64_t train_stream_end = std::numeric_limits<int64_t>::max();
  if (val_rule == "stream_tail") {
    int64_t num_stream_tokens = 0;
    for (int64_t doc_idx = 0; doc_idx < num_documents; ++doc_idx) {
      num_stream_tokens += static_cast<int64_t>(encode_document(documents[doc_idx]).tokens.size());
      report("count", doc_idx + 1, num_documents, num_stream_tokens);
    }
    train_stream_end =
        num_stream_tokens - static_cast<int64_t>(std::floor(static_cast<double>(num_stream_tokens) *
                                                            options.val_fraction));
  }

  const int64_t vocab_size = tokenizer->vocab_size();
  SplitWriter train(paths.staging, "train", options.shard_tokens, vocab_size, with_mask);
  SplitWriter val(paths.staging, "val", options.shard_tokens, vocab_size, with_mask);
  nlohmann::ordered_json documents_json = nlohmann::ordered_json::array();
  int64_t stream_pos = 0;
  for (int64_t doc_idx = 0; doc_idx < num_documents; ++doc_idx) {
    const Encoded encoded = encode_document(documents[doc_idx]);
    const auto num_tokens = static_cast<int64_t>(encoded.tokens.size());
    int64_t num_train = hash_is_val[doc_idx]
                            ? 0
                            : std::clamp<int64_t>(train_stream_end - stream_pos, 0, num_tokens);
    std::span<const int32_t> all(encoded.tokens), mask(encoded.mask);
    train.append(all.first(num_train), with_mask ? mask.first(num_train) : mask);
    val.append(all.subspan(num_train), with_mask ? mask.subspan(num_train) : mask);
    train.num_documents += num_train > 0 ? 1 : 0;
    val.num_documents += num_train < num_tokens ? 1 : 0;
    stream_pos += num_tokens;
    const char* split = num_train == num_tokens ? "train" : (num_train == 0 ? "val" : "train+val");
    nlohmann::ordered_json document_json;
    if (options.record_input_paths)
      document_json["path"] = documents[doc_idx].path.generic_string();
    document_json["relative_path"] = documents[doc_idx].relative_path;
    document_json["split"] = split;
    document_json["num_tokens"] = num_tokens;
    documents_json.push_back(std::move(document_json));
    report("encode", doc_idx + 1, num_documents, stream_pos);
  }
  train.finish();
  val.finish();

  nlohmann::ordered_json dataset = {
      {"format_version", kDatasetFormatVersion},
      {"tokenizer",
       {{"kind", tokenizer->kind()},
        {"vocab_size", vocab_size},
        {"bos_id", tokenizer->bos_id()},
        {"eos_id", tokenizer->eos_id()}}},
      {"vocab_size", vocab_size},
      {"token_bytes", token_bytes_for_vocab(vocab_size)},
      {"shard_tokens", options.shard_tokens},
      {"val_fraction", options.val_fraction},
      {"val_rule",
       {{"kind", val_rule}, {"description", val_rule_description(val_rule, options.val_fraction)}}},
      {"splits", {{"train", train.to_json()}, {"val", val.to_json()}}},
      {"loss_mask",
       with_mask ? "completion: each split's loss_mask_shards (vocab 2) mark the tokens counted as "
                   "targets, a document's completion and EOS"
                 : "none: every token is a target"},
      {"documents", documents_json},
  };
  io::write_file_atomic(paths.staging / kDatasetJsonName, dataset.dump(2) + "\n");

  publish(paths);
  staging_guard.release();
  report("done", num_documents, num_documents, stream_pos);

  PrepareSummary summary;
  summary.out_dir = paths.target;
  summary.tokenizer_kind = tokenizer->kind();
  summary.vocab_size = vocab_size;
  summary.val_rule = val_rule;
  summary.num_documents = num_documents;
  summary.num_train_documents = train.num_documents;
  summary.num_val_documents = val.num_documents;
  summary.num_train_tokens = train.num_tokens();
  summary.num_val_tokens = val.num_tokens();
  summary.train_shards = train.shard_names();
  summary.val_shards = val.shard_names();
  return summary;
}

}  // namespace moeforge::data
