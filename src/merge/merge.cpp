// merge_checkpoints: validation, output planning, the worker threads that compute and pwrite every
// piece of every tensor into preallocated shard files, the companion files and merge.json.
#include "merge/merge.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "io/atomic_file.h"
#include "merge/inputs.h"
#include "merge/merge_kernel.h"
#include "merge/output_layout.h"

namespace moeforge::merge {

namespace fs = std::filesystem;

namespace {

// The version of CMakeLists.txt's project(), recorded in merge.json.
constexpr const char* kMoeforgeVersion = "0.1.0";
// Elements of one work item. A worker holds one piece of output (at most 2 MiB in F64) and has one
// piece of each input mapped (N x at most 2 MiB), whatever the tensor sizes.
constexpr int64_t kPieceElements = int64_t{1} << 18;
constexpr auto kProgressInterval = std::chrono::milliseconds(200);
constexpr const char* kConfigFile = "config.json";
// Files of the newest input that travel with the merged weights.
constexpr const char* kCompanionFiles[] = {
    "moeforge_tokenizer.json", "tokenizer.model",        "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "generation_config.json", "vocab.json",     "merges.txt",
    "added_tokens.json",       "chat_template.jinja",
};

std::string config_dtype_name(io::DType dtype) {
  switch (dtype) {
    case io::DType::kF32: return "float32";
    case io::DType::kBF16: return "bfloat16";
    case io::DType::kF16: return "float16";
    case io::DType::kF64: return "float64";
    default: MF_FAIL("no config dtype name for {}", io::dtype_name(dtype));
  }
}

// Sets every "torch_dtype" / "dtype" string field (at any depth) to name; returns whether any was.
bool set_dtype_fields(nlohmann::ordered_json& value, const std::string& name) {
  bool found = false;
  if (value.is_object()) {
    for (auto& [key, item] : value.items()) {
      if ((key == "torch_dtype" || key == "dtype") && item.is_string()) {
        item = name;
        found = true;
      } else {
        found = set_dtype_fields(item, name) || found;
      }
    }
  } else if (value.is_array()) {
    for (nlohmann::ordered_json& item : value) found = set_dtype_fields(item, name) || found;
  }
  return found;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  MF_CHECK(in.is_open(), "cannot open '{}': {}", path.string(), std::strerror(errno));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// config.json of the newest input, with its dtype fields set to the output dtype when one is given
// (a "torch_dtype" field is added when it has none).
void write_config(const InputModel& newest, std::optional<io::DType> output_dtype,
                  const fs::path& dir) {
  const fs::path source = newest.dir / kConfigFile;
  if (!newest.config) return;
  if (!output_dtype) {
    io::write_file_atomic(dir / kConfigFile, read_text(source));
    return;
  }
  nlohmann::ordered_json config = nlohmann::ordered_json::parse(read_text(source));
  const std::string name = config_dtype_name(*output_dtype);
  if (!set_dtype_fields(config, name) && config.is_object()) config["torch_dtype"] = name;
  io::write_file_atomic(dir / kConfigFile, config.dump(2) + "\n");
}

void copy_companion_files(const fs::path& from, const fs::path& to) {
  for (const char* name : kCompanionFiles) {
    std::error_code ec;
    if (!fs::is_regular_file(from / name, ec)) continue;
    fs::copy_file(from / name, to / name, ec);
    MF_CHECK(!ec, "cannot copy '{}' into the merge output: {}", (from / name).string(),
             ec.message());
  }
}

nlohmann::json merge_info(const MergeOptions& options, const std::vector<InputModel>& inputs) {
  nlohmann::json input_list = nlohmann::json::array();
  for (size_t input_idx = 0; input_idx < inputs.size(); ++input_idx) {
    const InputInfo info = read_input_info(inputs[input_idx].dir);
    nlohmann::json entry = {
        {"path", inputs[input_idx].canonical.string()},
        {"weight", effective_weight(options.weights[input_idx], options.accumulate)},
        {"weight_fp64", options.weights[input_idx]}};
    if (info.step) entry["step"] = *info.step;
    if (info.tokens_seen) entry["tokens_seen"] = *info.tokens_seen;
    input_list.push_back(entry);
  }
  return {{"format_version", kMergeInfoFormatVersion},
          {"moeforge_version", kMoeforgeVersion},
          {"method", method_name(options.method)},
          {"alpha", options.alpha ? nlohmann::json(*options.alpha) : nlohmann::json(nullptr)},
          {"accumulate", accumulate_name(options.accumulate)},
          {"output_dtype",
           options.output_dtype ? io::dtype_name(*options.output_dtype) : std::string("input")},
          {"arithmetic",
           "weights rounded once from fp64 to the accumulation type; per element acc = w_1 x_1, "
           "then acc = acc + w_i x_i for i = 2..N oldest first, each product and sum rounded, no "
           "FMA; result rounded to nearest even into the output dtype"},
          {"inputs", input_list}};
}

[[noreturn]] void fail_errno(const char* action, const fs::path& path) {
  const int saved_errno = errno;
  MF_FAIL("cannot {} '{}': {}", action, path.string(), std::strerror(saved_errno));
}

// The output shard files, created with their headers and preallocated to their final size.
class ShardFiles {
 public:
  ShardFiles(const fs::path& dir, const std::vector<PlannedShard>& shards) {
    try {
      for (const PlannedShard& shard : shards) create(dir / shard.file_name, shard);
    } catch (...) {
      close_all();
      throw;
    }
  }
  ~ShardFiles() { close_all(); }
  ShardFiles(const ShardFiles&) = delete;
  ShardFiles& operator=(const ShardFiles&) = delete;

  // pwrite of all n bytes (thread-safe).
  void write(size_t shard_idx, const void* data, size_t n, uint64_t offset) const {
    const auto* cursor = static_cast<const std::byte*>(data);
    while (n > 0) {
      const ssize_t num_written = ::pwrite(fds_[shard_idx], cursor, n, static_cast<off_t>(offset));
      if (num_written < 0) {
        if (errno == EINTR) continue;
        fail_errno("write", paths_[shard_idx]);
      }
      cursor += num_written;
      offset += static_cast<uint64_t>(num_written);
      n -= static_cast<size_t>(num_written);
    }
  }

  // Closes every file, reporting errors (the destructor closes silently).
  void close() {
    for (size_t shard_idx = 0; shard_idx < fds_.size(); ++shard_idx) {
      const int fd = fds_[shard_idx];
      fds_[shard_idx] = -1;
      if (::close(fd) != 0) fail_errno("close", paths_[shard_idx]);
    }
  }

 private:
  void create(const fs::path& path, const PlannedShard& shard) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) fail_errno("create", path);
    fds_.push_back(fd);
    paths_.push_back(path);
    const int error = ::posix_fallocate(fd, 0, static_cast<off_t>(shard.file_size));
    MF_CHECK(error == 0, "cannot allocate {} bytes for '{}': {}", shard.file_size, path.string(),
             std::strerror(error));
    write(fds_.size() - 1, shard.prefix.data(), shard.prefix.size(), 0);
  }

  void close_all() {
    for (int& fd : fds_) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
  }

  std::vector<int> fds_;
  std::vector<fs::path> paths_;
};

// A page fault maps the whole page-cache folio around the address (up to 2 MiB on x86-64), which
// can reach back into input already merged; releases cover that much before a piece as well.
constexpr size_t kReleaseMarginBytes = size_t{4} << 20;

// Drops the pages of [begin, end) of an input mapping once merged, so that resident memory does not
// grow with the model (the page cache keeps them; a later read faults them back). The range is
// widened to whole pages, which stay inside the same file mapping.
void release_pages(const std::byte* begin, const std::byte* end) {
  static_assert(sizeof(uintptr_t) == sizeof(void*));
  const auto page_size = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto first = reinterpret_cast<uintptr_t>(begin) & ~(page_size - 1);
  const auto last = (reinterpret_cast<uintptr_t>(end) + page_size - 1) & ~(page_size - 1);
  // Advice only: the mapping is read-only and file-backed, so its contents cannot change.
  ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

// For every planned tensor, where the data of its file starts in the input's mapping: tensors of
// one safetensors file are contiguous, and two files' data never touch (each mapping starts with
// its header), so a chain of adjacent tensors is exactly one file's data buffer.
std::vector<const std::byte*> file_data_starts(const io::ModelWeights& weights,
                                               const std::vector<PlannedTensor>& tensors) {
  std::vector<std::pair<const std::byte*, size_t>> by_address;  // (data begin, tensor_idx)
  for (size_t tensor_idx = 0; tensor_idx < tensors.size(); ++tensor_idx) {
    by_address.emplace_back(weights.data(tensors[tensor_idx].name).data(), tensor_idx);
  }
  std::sort(by_address.begin(), by_address.end());
  std::vector<const std::byte*> starts(tensors.size());
  const std::byte* chain_start = nullptr;
  const std::byte* chain_end = nullptr;
  for (const auto& [begin, tensor_idx] : by_address) {
    if (begin != chain_end) chain_start = begin;
    chain_end = begin + weights.data(tensors[tensor_idx].name).size();
    starts[tensor_idx] = chain_start;
  }
  return starts;
}

struct Piece {
  size_t tensor_idx = 0;
  int64_t begin = 0;  // element range [begin, end)
  int64_t end = 0;
};

std::vector<Piece> split_into_pieces(const OutputLayout& layout) {
  std::vector<Piece> pieces;
  for (size_t tensor_idx = 0; tensor_idx < layout.tensors.size(); ++tensor_idx) {
    const PlannedTensor& tensor = layout.tensors[tensor_idx];
    if (!tensor.averaged) {
      pieces.push_back({tensor_idx, 0, tensor.numel});
      continue;
    }
    for (int64_t begin = 0; begin < tensor.numel; begin += kPieceElements) {
      pieces.push_back({tensor_idx, begin, std::min(tensor.numel, begin + kPieceElements)});
    }
  }
  return pieces;
}

// Runs the pieces on worker threads; the calling thread reports progress until they are done.
class MergeRun {
 public:
  MergeRun(const std::vector<InputModel>& inputs, const OutputLayout& layout,
           const MergeOptions& options, const ShardFiles& files)
      : inputs_(inputs),
        layout_(layout),
        options_(options),
        files_(files),
        pieces_(split_into_pieces(layout)),
        pieces_left_(layout.tensors.size()) {
    for (const Piece& piece : pieces_) ++pieces_left_[piece.tensor_idx];
    for (const InputModel& input : inputs) {
      file_data_starts_.push_back(file_data_starts(input.weights, layout.tensors));
    }
    for (size_t tensor_idx = 0; tensor_idx < layout.tensors.size(); ++tensor_idx) {
      const PlannedTensor& tensor = layout.tensors[tensor_idx];
      total_bytes_ +=
          inputs.size() * static_cast<uint64_t>(tensor.numel) * io::dtype_size(tensor.in_dtype);
      if (pieces_left_[tensor_idx] == 0) ++tensors_done_;
    }
  }

  // Returns the input bytes read; rethrows the first error of any worker.
  uint64_t run(int num_threads, const std::function<void(const MergeProgress&)>& progress) {
    const int num_workers =
        std::max(1, std::min<int>(num_threads, static_cast<int>(pieces_.size())));
    std::vector<std::thread> workers;
    num_running_ = num_workers;
    try {
      for (int worker_idx = 0; worker_idx < num_workers; ++worker_idx) {
        workers.emplace_back([this] { work(); });
      }
      report_until_done(progress);
    } catch (...) {
      stop_ = true;
      for (std::thread& worker : workers) worker.join();
      throw;
    }
    for (std::thread& worker : workers) worker.join();
    if (error_) std::rethrow_exception(error_);
    return bytes_read_;
  }

 private:
  void report_until_done(const std::function<void(const MergeProgress&)>& progress) {
    bool done = false;
    while (!done) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        done = done_cv_.wait_for(lock, kProgressInterval, [this] { return num_running_ == 0; });
      }
      if (progress && !stop_) {
        progress(MergeProgress{tensors_done_.load(), static_cast<int64_t>(layout_.tensors.size()),
                               bytes_read_.load(), total_bytes_});
      }
    }
  }

  void work() {
    std::vector<std::byte> buffer(static_cast<size_t>(kPieceElements) * sizeof(double));
    std::vector<const std::byte*> sources(inputs_.size());
    while (!stop_) {
      const size_t piece_idx = next_piece_.fetch_add(1);
      if (piece_idx >= pieces_.size()) break;
      try {
        merge_piece(pieces_[piece_idx], buffer, sources);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        stop_ = true;
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    --num_running_;
    done_cv_.notify_all();
  }

  void merge_piece(const Piece& piece, std::vector<std::byte>& buffer,
                   std::vector<const std::byte*>& sources) {
    const PlannedTensor& tensor = layout_.tensors[piece.tensor_idx];
    const size_t in_size = io::dtype_size(tensor.in_dtype);
    const size_t out_size = io::dtype_size(tensor.out_dtype);
    const auto count = static_cast<size_t>(piece.end - piece.begin);
    const uint64_t offset = tensor.file_offset + static_cast<uint64_t>(piece.begin) * out_size;
    if (!tensor.averaged) {
      const std::span<const std::byte> data = inputs_.back().weights.data(tensor.name);
      files_.write(tensor.shard_idx, data.data(), data.size(), offset);
      bytes_read_ += data.size() * inputs_.size();
    } else {
      for (size_t input_idx = 0; input_idx < inputs_.size(); ++input_idx) {
        sources[input_idx] = inputs_[input_idx].weights.data(tensor.name).data() +
                             static_cast<size_t>(piece.begin) * in_size;
      }
      merge_elements(sources, tensor.in_dtype, options_.weights, options_.accumulate,
                     tensor.out_dtype, static_cast<int64_t>(count), buffer.data());
      files_.write(tensor.shard_idx, buffer.data(), count * out_size, offset);
      for (size_t input_idx = 0; input_idx < inputs_.size(); ++input_idx) {
        const std::byte* source = sources[input_idx];
        const std::byte* file_start = file_data_starts_[input_idx][piece.tensor_idx];
        const size_t margin =
            std::min(kReleaseMarginBytes, static_cast<size_t>(source - file_start));
        release_pages(source - margin, source + count * in_size);
      }
      bytes_read_ += count * in_size * inputs_.size();
    }
    if (--pieces_left_[piece.tensor_idx] == 0) ++tensors_done_;
  }

  const std::vector<InputModel>& inputs_;
  const OutputLayout& layout_;
  const MergeOptions& options_;
  const ShardFiles& files_;
  const std::vector<Piece> pieces_;
  std::vector<std::atomic<int64_t>> pieces_left_;                // per tensor
  std::vector<std::vector<const std::byte*>> file_data_starts_;  // [input][tensor]
  uint64_t total_bytes_ = 0;
  std::atomic<size_t> next_piece_{0};
  std::atomic<int64_t> tensors_done_{0};
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable done_cv_;
  int num_running_ = 0;       // guarded by mutex_
  std::exception_ptr error_;  // guarded by mutex_ (read after the workers finish)
};

}  // namespace

MergeSummary merge_checkpoints(const MergeOptions& options,
                               const std::function<void(const MergeProgress&)>& progress) {
  const auto start = std::chrono::steady_clock::now();
  const fs::path output = check_paths(options.inputs, options.output);
  MF_CHECK(options.weights.size() == options.inputs.size(),
           "got {} weights for {} inputs; give one weight per input", options.weights.size(),
           options.inputs.size());
  for (size_t input_idx = 0; input_idx < options.weights.size(); ++input_idx) {
    MF_CHECK(std::isfinite(options.weights[input_idx]), "weight {} of input '{}' is not finite",
             options.weights[input_idx], options.inputs[input_idx].string());
  }
  MF_CHECK(options.num_threads >= 0, "num_threads must be >= 0 (0: all cores), got {}",
           options.num_threads);
  const std::vector<InputModel> inputs = open_inputs(options.inputs);
  check_inputs_match(inputs);
  const OutputLayout layout = plan_output(inputs, options.output_dtype, options.max_shard_bytes);

  io::StagedDirectory staged(output);
  const fs::path dir = staged.staging_path();
  ShardFiles files(dir, layout.shards);
  const int num_threads = options.num_threads > 0
                              ? options.num_threads
                              : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  MergeRun run(inputs, layout, options, files);
  const uint64_t bytes_read = run.run(num_threads, progress);
  files.close();

  if (!layout.index_json.empty()) {
    io::write_file_atomic(dir / io::kWeightsIndexFile, layout.index_json);
  }
  write_config(inputs.back(), options.output_dtype, dir);
  copy_companion_files(inputs.back().dir, dir);
  io::write_file_atomic(dir / kMergeInfoFile, merge_info(options, inputs).dump(2) + "\n");
  staged.commit();

  MergeSummary summary;
  summary.num_tensors = static_cast<int64_t>(layout.tensors.size());
  summary.bytes_read = bytes_read;
  for (const PlannedShard& shard : layout.shards) summary.bytes_written += shard.file_size;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

}  // namespace moeforge::merge
