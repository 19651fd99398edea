// PMA checkpoint merging (../shared/docs/pma.md): a weighted average of N model directories
// M_1..M_N (oldest first), streamed one tensor at a time from mmap'd safetensors, with pinned
// arithmetic so that a merge is bit-reproducible on any machine and thread count:
//   weights computed in fp64, rounded once to fp32 (or kept in fp64 with Accumulate::kFp64);
//   for every element: acc = 0; for i = 1..N: acc = fl(acc + fl(w_i * x_i)) (no fused
//   multiply-add); the result rounded to nearest even into the output dtype.
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
// kCustom takes `custom` (N finite values). Throws on N = 0, alpha outside (0, 1], a custom count
// that differs from N.
std::vector<double> merge_weights(Method method, int64_t num_inputs, double alpha,
                                  const std::vector<double>& custom);

enum class Accumulate { kFp32, kFp64 };

struct MergeOptions {
  std::vector<std::filesystem::path> inputs;  // model directories, oldest first
  std::filesystem::path output;               // must not exist, must not be an input
  std::vector<double> weights;                // one per input (from merge_weights)
  std::optional<io::DType> output_dtype;      // default: the inputs' dtype, per tensor
  Accumulate accumulate = Accumulate::kFp32;
  int num_threads = 0;                        // 0: hardware concurrency
  uint64_t max_shard_bytes = 5'000'000'000;
};

struct MergeProgress {
  int64_t tensors_done = 0;
  int64_t num_tensors = 0;
  uint64_t bytes_read = 0;
  uint64_t total_bytes = 0;
};

struct MergeSummary {
  int64_t num_tensors = 0;
  uint64_t bytes_read = 0;      // input tensor bytes read (N x model size)
  uint64_t bytes_written = 0;
  double seconds = 0.0;
};

// Validates every input before any work (same config.json apart from dtype fields, same tensor
// names, shapes and dtypes; errors name the first mismatch), then merges into a staging directory
// next to `output` and renames it into place. config.json (and tokenizer files) are carried over
// from the newest input. Nothing is left at `output` on failure.
MergeSummary merge_checkpoints(const MergeOptions& options,
                               const std::function<void(const MergeProgress&)>& progress = {});

}  // namespace moeforge::merge
