// `moeforge merge`: PMA checkpoint merging (SMA, EMA, WMA or custom weights) of listed model
// directories or of evenly spaced checkpoints of a training run, with pinned arithmetic.
#include <fmt/format.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <optional>

#include "cli/commands.h"
#include "core/error.h"
#include "merge/merge.h"
#include "merge/select.h"

namespace moeforge::cli {

namespace {

struct MergeArgs {
  std::vector<std::string> inputs;
  std::string out, method = "sma", dtype, accumulate = "fp32", run;
  std::optional<double> alpha;
  std::string weights;
  int threads = 0;
  double max_shard_bytes = 5e9;
  std::optional<int64_t> count, interval, until;
};

constexpr const char* kMergeFooter = R"(Weights (inputs M_1..M_N oldest first):
  sma   w_i = 1/N
  wma   w_i = 2i / (N(N+1))                  (newer checkpoints weigh more)
  ema   the recursion M^(1) = M_1, M^(i) = a M_i + (1-a) M^(i-1) applied to all N inputs,
        i.e. the effective weights w_1 = (1-a)^(N-1), w_i = a (1-a)^(N-i) for i >= 2, which sum to
        1 (the paper's closed form a(1-a)^(N-i) for every i does not)
  --weights w1,...,wN   custom weights, used as given (not normalised)
Arithmetic (bit-reproducible on any machine and thread count): weights computed in fp64 and rounded
once to fp32; per element acc = w_1 x_1, then acc = acc + w_i x_i for i = 2..N, every product and
sum rounded to fp32 (no FMA); the result rounded to nearest even into the output dtype.
--accumulate fp64 does the same in fp64 with fp64 weights.
Selection from a run: --run RUN --count N --interval V [--until T] takes the newest checkpoint of
RUN/checkpoints/index.json with tokens_seen <= T (default: the newest) and those at tokens_seen
last - k V for k = 1..N-1.
The output must not exist (merge never overwrites) and must not be or lie inside an input.
Floating tensors are averaged, integer tensors (equal in every input) copied; config.json,
tokenizer and generation files come from the newest input; merge.json records the merge.
Prints one line per input with its weight, progress on stderr, and a JSON summary on stdout.)";

// "w1,w2,..." -> numbers; empty text -> none.
std::vector<double> parse_weights(const std::string& text) {
  std::vector<double> weights;
  if (text.empty()) return weights;
  size_t begin = 0;
  while (true) {
    const size_t end = std::min(text.find(',', begin), text.size());
    const std::string item = text.substr(begin, end - begin);
    double value = 0.0;
    const auto [rest, error] = std::from_chars(item.data(), item.data() + item.size(), value);
    MF_CHECK(!item.empty() && error == std::errc() && rest == item.data() + item.size(),
             "--weights: '{}' is not a number (expected w1,w2,...,wN)", item);
    weights.push_back(value);
    if (end == text.size()) return weights;
    begin = end + 1;
  }
}

std::string input_line(const std::filesystem::path& path, const merge::InputInfo& info,
                       double weight, merge::Accumulate accumulate) {
  std::string line = "  " + path.string();
  if (info.step) line += fmt::format("  step {}", *info.step);
  if (info.tokens_seen) line += fmt::format("  tokens {}", *info.tokens_seen);
  if (accumulate == merge::Accumulate::kFp32) {
    line += fmt::format("  weight {} (fp64 {})", static_cast<float>(weight), weight);
  } else {
    line += fmt::format("  weight {}", weight);
  }
  return line;
}

// Progress on stderr: rewritten in place on a terminal, else one line every 10 s.
class ProgressPrinter {
 public:
  ProgressPrinter() : terminal_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressPrinter() {
    if (terminal_ && printed_) std::fputc('\n', stderr);
  }
  ProgressPrinter(const ProgressPrinter&) = delete;
  ProgressPrinter& operator=(const ProgressPrinter&) = delete;

  void operator()(const merge::MergeProgress& p) {
    const auto now = std::chrono::steady_clock::now();
    const auto interval = terminal_ ? std::chrono::milliseconds(200) : std::chrono::seconds(10);
    const bool finished = p.tensors_done == p.num_tensors;
    if (now - last_ < interval && !(terminal_ && finished)) return;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const std::string text = fmt::format(
        "merge: {}/{} tensors, {:.2f}/{:.2f} GB read, {:.2f} GB/s", p.tensors_done, p.num_tensors,
        p.bytes_read / 1e9, p.total_bytes / 1e9, seconds > 0 ? p.bytes_read / 1e9 / seconds : 0.0);
    std::fprintf(stderr, terminal_ ? "\r%s" : "%s\n", text.c_str());
    std::fflush(stderr);
    printed_ = true;
  }

 private:
  bool terminal_;
  bool printed_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_ = start_;
};

void run_merge(const MergeArgs& args) {
  merge::MergeOptions options;
  std::vector<merge::InputInfo> infos;
  if (!args.run.empty()) {
    MF_CHECK(args.inputs.empty(),
             "give either checkpoint directories or --run, not both ({} directories and --run {})",
             args.inputs.size(), args.run);
    MF_CHECK(args.count && args.interval,
             "--run needs --count N and --interval TOKENS (the spacing of the checkpoints)");
    const std::vector<io::CheckpointEntry> entries = merge::select_checkpoints(
        args.run, merge::CheckpointSelection{*args.count, *args.interval, args.until});
    for (const io::CheckpointEntry& entry : entries) {
      options.inputs.push_back(entry.path);
      infos.push_back(merge::InputInfo{entry.step, entry.tokens_seen});
    }
  } else {
    MF_CHECK(!args.inputs.empty(),
             "nothing to merge: list checkpoint directories (oldest first) or use --run");
    MF_CHECK(!args.count && !args.interval && !args.until,
             "--count, --interval and --until select checkpoints of a --run");
    for (const std::string& input : args.inputs) {
      options.inputs.emplace_back(input);
      infos.push_back(merge::read_input_info(input));
    }
  }

  const auto num_inputs = static_cast<int64_t>(options.inputs.size());
  const std::vector<double> custom = parse_weights(args.weights);
  options.method = custom.empty() ? merge::parse_method(args.method) : merge::Method::kCustom;
  MF_CHECK(custom.empty() || args.method == "sma" || args.method == "custom",
           "--weights gives custom weights; it cannot be combined with --method {}", args.method);
  MF_CHECK(options.method != merge::Method::kEma || args.alpha.has_value(),
           "--method ema needs --alpha (the paper uses 0.1 or 0.2)");
  MF_CHECK(options.method == merge::Method::kEma || !args.alpha.has_value(),
           "--alpha applies to --method ema only");
  MF_CHECK(options.method != merge::Method::kCustom || !custom.empty(),
           "--method custom needs --weights w1,...,wN");
  options.alpha = args.alpha;
  options.weights =
      merge::merge_weights(options.method, num_inputs, args.alpha.value_or(0.0), custom);
  options.output = args.out;
  options.accumulate = merge::parse_accumulate(args.accumulate);
  if (!args.dtype.empty()) {
    const io::DType dtype = io::parse_dtype(args.dtype);
    MF_CHECK(dtype == io::DType::kF32 || dtype == io::DType::kBF16 || dtype == io::DType::kF16,
             "--dtype {} is not supported: use F32, BF16 or F16", args.dtype);
    options.output_dtype = dtype;
  }
  options.num_threads = args.threads;
  MF_CHECK(args.max_shard_bytes >= 1 && args.max_shard_bytes < 1.8e19,
           "--max-shard-bytes must be a positive byte count, got {}", args.max_shard_bytes);
  options.max_shard_bytes = static_cast<uint64_t>(args.max_shard_bytes);

  fmt::print("merge: {} checkpoints, method {}{}, accumulate {}, output dtype {} -> {}\n",
             num_inputs, merge::method_name(options.method),
             args.alpha ? fmt::format(" (alpha {})", *args.alpha) : "", args.accumulate,
             args.dtype.empty() ? "as inputs" : args.dtype, args.out);
  for (size_t input_idx = 0; input_idx < options.inputs.size(); ++input_idx) {
    fmt::print("{}\n", input_line(options.inputs[input_idx], infos[input_idx],
                                  options.weights[input_idx], options.accumulate));
  }
  std::fflush(stdout);

  merge::MergeSummary summary;
  {
    ProgressPrinter printer;
    summary = merge::merge_checkpoints(options,
                                       [&printer](const merge::MergeProgress& p) { printer(p); });
  }
  const nlohmann::json line = {
      {"output", args.out},
      {"tensors", summary.num_tensors},
      {"bytes_read", summary.bytes_read},
      {"bytes_written", summary.bytes_written},
      {"seconds", summary.seconds},
      {"read_GBps", summary.seconds > 0 ? summary.bytes_read / 1e9 / summary.seconds : 0.0}};
  fmt::print("{}\n", line.dump());
}

}  // namespace

void register_merge_command(CLI::App& app) {
  auto args = std::make_shared<MergeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "merge", "Average checkpoints (PMA: SMA, EMA, WMA or custom weights) into a new model");
  cmd->footer(kMergeFooter);
  cmd->add_option("inputs", args->inputs, "Checkpoint / model directories, oldest first");
  cmd->add_option("--out", args->out, "Output directory (must not exist)")->required();
  cmd->add_option("--method", args->method, "sma, ema, wma (or custom with --weights)")
      ->check(CLI::IsMember({"sma", "ema", "wma", "custom"}))
      ->capture_default_str();
  cmd->add_option("--alpha", args->alpha, "EMA alpha in (0, 1]");
  cmd->add_option("--weights", args->weights, "Custom weights w1,...,wN (one per input)");
  cmd->add_option("--dtype", args->dtype,
                  "Output dtype F32, BF16 or F16 (default: each tensor's input dtype)");
  cmd->add_option("--accumulate", args->accumulate, "Accumulation precision: fp32 or fp64")
      ->check(CLI::IsMember({"fp32", "fp64"}))
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "Worker threads (0: all cores)")
      ->capture_default_str();
  cmd->add_option("--max-shard-bytes", args->max_shard_bytes,
                  "Largest output shard in bytes (sharded HF layout with an index above it)")
      ->capture_default_str();
  cmd->add_option("--run", args->run, "Training run directory to select checkpoints from");
  cmd->add_option("--count", args->count, "With --run: number of checkpoints N");
  cmd->add_option("--interval", args->interval, "With --run: tokens V between checkpoints");
  cmd->add_option("--until", args->until,
                  "With --run: the last checkpoint is the newest with tokens_seen <= this");
  cmd->callback([args] { run_merge(*args); });
}

}  // namespace moeforge::cli
