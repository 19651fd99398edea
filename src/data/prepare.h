// Data preparation: text files -> tokenizer + train/val token shards + dataset.json.
//
// Every input file is one document, tokenized as [BOS] + encode(text) + [EOS]; documents are
// concatenated, in input order (folders walked recursively in sorted order), into the stream of
// their split, which is cut into shards of shard_tokens tokens (train-00000.bin, val-00000.bin);
// with PrepareOptions::completion_spans a loss mask beside them (completion-only loss).
//
// Validation split (recorded in dataset.json as "val_rule"):
// - "document_hash": a document goes to val when fnv1a64(relative_path + '\0' + content) % 10000
//   < round(val_fraction * 10000), where relative_path is the file's path relative to the input
//   folder it was found in (its file name for a file given directly), with '/' separators. The
//   split of a document therefore depends only on its name and text, not on the other files.
// - "stream_tail": when that rule leaves val or train without documents (few files), every
//   document goes into one stream and its last floor(val_fraction * num_tokens) tokens are val.
// - "none": val_fraction == 0, every document is train.
// The sentencepiece tokenizer is trained on the train documents ("document_hash") or on every
// document (the other rules).
//
// The output is built in a hidden staging folder beside out_dir (.<name>.staging) and renamed to
// out_dir at the end, so an interrupted run leaves no half dataset (a stale staging folder of an
// interrupted run is removed by the next run).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge::data {

inline constexpr int64_t kDatasetFormatVersion = 1;
inline constexpr const char* kDatasetJsonName = "dataset.json";

struct InputDocument {
  std::filesystem::path path;  // as reached from the input (input / relative_path)
  std::string relative_path;   // relative to its input root, '/' separators
};

// Bytes [begin, end) of a document's text; end = npos: to the text's end.
struct CompletionSpan {
  size_t begin = 0;
  size_t end = std::string::npos;
};

struct PrepareOptions {
  // Files or folders. Folders are walked recursively in sorted order, skipping hidden entries
  // (names starting with '.'); a file reached twice (through a symlink or overlapping inputs) is
  // taken once; files inside out_dir are skipped.
  std::vector<std::filesystem::path> inputs;
  // Glob patterns (fnmatch) tried against a file's name and its path relative to its input root.
  // include_globs empty: every file; exclude_globs win, e.g. {"*.dat", "*.u8"} for fortunes.
  std::vector<std::string> include_globs;
  std::vector<std::string> exclude_globs;
  std::filesystem::path out_dir;
  bool overwrite = false;          // replace an existing non-empty out_dir
  std::string tokenizer = "byte";  // or "sentencepiece"
  int sp_vocab_size = 4096;
  double val_fraction = 0.05;  // in [0, 0.5]
  uint64_t shard_tokens = 100'000'000;
  // dataset.json's document list names each document's input path; false: its relative path
  // only (the inputs are temporary files, as for `data synth --format train`).
  bool record_input_paths = true;
  // Loss on completions only (supervised fine-tuning): when set, the byte ranges of each
  // document's text that are completions (one for a prompt and its answer; several for a
  // document of several questions and answers). The document is then encoded piece by piece,
  // [BOS] + encode(text before the first completion) + encode(that completion) + ... + [EOS], and
  // each split gets loss mask shards (train-00000.mask.bin, ...: token shards of vocab 2, one per
  // token shard, listed as "loss_mask_shards") holding 1 for the completions' tokens and EOS, 0
  // elsewhere; the loader turns the other targets into -1 (ignored). Ranges out of order,
  // overlapping or past the text's end are an error.
  std::function<std::vector<CompletionSpan>(const InputDocument& document)> completion_spans;
};

struct PrepareProgress {
  std::string stage;  // "scan", "train_tokenizer", "count", "encode", "done"
  int64_t num_documents_done = 0;
  int64_t num_documents = 0;
  int64_t num_tokens_done = 0;
};
using PrepareProgressFn = std::function<void(const PrepareProgress&)>;

struct PrepareSummary {
  std::filesystem::path out_dir;
  std::string tokenizer_kind;
  int64_t vocab_size = 0;
  std::string val_rule;  // "document_hash", "stream_tail" or "none"
  int64_t num_documents = 0;
  int64_t num_train_documents = 0;  // documents wholly or partly in train
  int64_t num_val_documents = 0;    // documents wholly or partly in val
  int64_t num_train_tokens = 0;
  int64_t num_val_tokens = 0;
  std::vector<std::string> train_shards;  // file names inside out_dir
  std::vector<std::string> val_shards;
};

// The documents prepare_dataset would read, in order. Throws when none is found, listing the
// searched paths.
std::vector<InputDocument> collect_input_documents(const PrepareOptions& options);

// The split hash: FNV-1a 64 over relative_path, a zero byte, then content.
uint64_t document_split_hash(std::string_view relative_path, std::string_view content);
bool hash_selects_val(uint64_t split_hash, double val_fraction);

PrepareSummary prepare_dataset(const PrepareOptions& options,
                               const PrepareProgressFn& progress = {});

}  // namespace moeforge::data
