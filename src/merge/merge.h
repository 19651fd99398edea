// PMA checkpoint merging (../shared/docs/pma.md): a weighted average of N model directories
// M_1..M_N (oldest first), streamed one tensor at a time from mmap'd safetensors, with pinned
// arithmetic so that a merge is bit-reproducible on any machine and thread count:
//   weights computed in fp64, rounded once to fp32 (or kept in fp64 with Accumulate::kFp64);
//   inputs converted exactly to the accumulation type (F64 inputs are rounded to fp32 in kFp32);
//   for every element: acc = fl(w_1 * x_1); for i = 2..N: acc = fl(acc + fl(w_i * x_i)) (no fused
//   multiply-add); the result rounded to nearest even into the output dtype (directly from fp64
//   in kFp64, never through fp32). Starting from the first product is the same as starting from
//   acc = 0, except that it keeps the sign of a zero (-0 + -0 = -0 but 0 + -0 = +0).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "io/dtype.h"

namespace moeforge::merge {

enum class Method { kSma, kEma, kWma, kCustom };

Method parse_method(const std::string& name);  // "sma" | "ema" | "wma" | "custom"
std::string method_name(Method method);

// Weights of N checkpoints, oldest first, in fp64:
//   SMA w_i = 1/N; WMA w_i = 2i / (N(N+1)); EMA (the recursion M^(1) = M_1,
//   M^(i) = a M_i + (1-a) M^(i-1)) gives w_1 = (1-a)^(N-1), w_i = a (1-a)^(N-i) for i >= 2.
// EMA weights are evaluated in the recursion's own order (w_i = a, then multiplied by (1-a) once
// per later checkpoint), so they equal the recursion applied in fp64 bit for bit and sum to 1.
// kCustom takes `custom` (N finite values, used as given: not normalised). Throws on N = 0, alpha
// outside (0, 1], a custom count that differs from N.
std::vector<double> merge_weights(Method method, int64_t num_inputs, double alpha,
                                  const std::vector<double>& custom);

enum class Accumulate { kFp32, kFp64 };

std::string accumulate_name(Accumulate accumulate);  // "fp32" | "fp64"
Accumulate parse_accumulate(const std::string& name);

// The weight the arithmetic multiplies by: the fp64 weight rounded once to fp32 (kFp32), or
// itself (kFp64).
double effective_weight(double weight, Accumulate accumulate);

// Step and tokens seen of a checkpoint, when its directory says (moeforge checkpoints carry
// trainer_state.json); both empty for other model directories.
struct InputInfo {
  std::optional<int64_t> step;
  std::optional<int64_t> tokens_seen;
};
InputInfo read_input_info(const std::filesystem::path& dir);

struct MergeOptions {
  std::vector<std::filesystem::path> inputs;  // model directories, oldest first
  std::filesystem::path output;               // must not exist, must not be an input
  std::vector<double> weights;                // one per input (from merge_weights)
  std::optional<io::DType> output_dtype;      // default: the inputs' dtype, per tensor
  Accumulate accumulate = Accumulate::kFp32;
  int num_threads = 0;  // 0: hardware concurrency
  uint64_t max_shard_bytes = 5'000'000'000;
  // Provenance recorded in the output's merge.json; does not change the arithmetic.
  Method method = Method::kCustom;
  std::optional<double> alpha;  // EMA's alpha
};

struct MergeProgress {
  int64_t tensors_done = 0;
  int64_t num_tensors = 0;
  uint64_t bytes_read = 0;
  uint64_t total_bytes = 0;
};

struct MergeSummary {
  int64_t num_tensors = 0;
  uint64_t bytes_read = 0;     // input tensor bytes read (N x model size)
  uint64_t bytes_written = 0;  // weight files of the output (headers and tensor bytes)
  double seconds = 0.0;
};

// Name of the provenance file written into every merge output.
inline constexpr const char* kMergeInfoFile = "merge.json";
inline constexpr int kMergeInfoFormatVersion = 1;

// Validates every input before any work (same config.json apart from dtype and transformers
// version fields, same tensor names, shapes and dtypes; errors name the first mismatch with the
// input path and the tensor; the output must not exist nor be or lie inside an input; no input
// twice), then merges into a staging directory next to `output` and renames it into place.
// Floating tensors (F32, BF16, F16, F64) are averaged; other tensors (integers, bool) must be equal
// in every input and are copied. The output is laid out first (shards of at most max_shard_bytes,
// HF names model-0000i-of-0000N.safetensors plus model.safetensors.index.json, tensors in the
// newest input's file order), then worker threads write each piece (256 Ki elements) of each
// tensor at its offset, dropping the input pages they have read from their mappings: resident
// memory stays near num_threads x (N + 1) pieces plus a few MiB of mapped page-cache folios per
// input, whatever the model and tensor sizes. config.json (dtype
// fields set when output_dtype is given), tokenizer and generation files come from the newest
// input; merge.json records method, weights, inputs and arithmetic. Nothing is left at `output` on
// failure. Thread-safe (no global state); progress is called from the calling thread.
MergeSummary merge_checkpoints(const MergeOptions& options,
                               const std::function<void(const MergeProgress&)>& progress = {});

}  // namespace moeforge::merge
