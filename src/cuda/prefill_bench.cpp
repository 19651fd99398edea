// Dense against FlexPrefill prefill attention on one GPU, per sequence length (see
// prefill_bench.h).
#include "cuda/prefill_bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/bf16.h"
#include "cuda/block_sparse_attention.h"
#include "cuda/device_info.h"
#include "cuda/device_memory.h"
#include "cuda/event_timing.h"
#include "cuda/flex_prefill.h"
#include "cuda/kernel_timeline.h"
#include "cuda/random_fill.h"
#include "infer/qkv_dump.h"
#include "io/safetensors.h"
#include "ops/block_sparse_attention.h"

namespace moeforge::cuda {
namespace {

// The inputs of one length: device q, k, v [seq, heads, head_dim].
struct Inputs {
  DeviceBuffer<bf16> q, k, v;
};

Inputs make_inputs(const PrefillBenchOptions& opt, const PrefillQkv* dump, int64_t seq,
                   uint64_t seed) {
  Inputs in;
  const int64_t q_size = seq * opt.num_heads * opt.head_dim;
  const int64_t kv_size = seq * opt.num_kv_heads * opt.head_dim;
  if (dump != nullptr) {
    // The first seq positions of the dump (token-major, so a prefix of each array).
    in.q.upload(to_bf16(std::vector<float>(dump->q.begin(), dump->q.begin() + q_size)));
    in.k.upload(to_bf16(std::vector<float>(dump->k.begin(), dump->k.begin() + kv_size)));
    in.v.upload(to_bf16(std::vector<float>(dump->v.begin(), dump->v.begin() + kv_size)));
    return in;
  }
  in.q.resize(static_cast<size_t>(q_size));
  in.k.resize(static_cast<size_t>(kv_size));
  in.v.resize(static_cast<size_t>(kv_size));
  fill_uniform_bf16(in.q.data(), q_size, seed, 1.0f, nullptr);
  fill_uniform_bf16(in.k.data(), kv_size, seed + 1, 1.0f, nullptr);
  fill_uniform_bf16(in.v.data(), kv_size, seed + 2, 1.0f, nullptr);
  return in;
}

// Times fn into entry[key + "_ms"], or its error into entry[key + "_error"]; with a timeline, then
// records one more run of fn into it (tagged with entry's "seq" and the part, key).
void time_into(nlohmann::json& entry, const std::string& key, int64_t repeats,
               std::ostream* timeline, const std::function<void()>& fn) {
  try {
    entry[key + "_ms"] = median_event_ms(repeats, fn);
  } catch (const Error& error) {
    cudaGetLastError();
    entry[key + "_error"] = error.what();
    return;
  }
  if (timeline == nullptr) return;
  KernelTimeline recording;
  fn();
  write_timeline_jsonl(*timeline, recording.finish(), {{"seq", entry["seq"]}, {"part", key}});
}

// The given block sets of one length (PrefillBenchOptions::layout_file).
ops::BlockSparseLayout read_layout(const io::SafetensorsFile& file, const PrefillBenchOptions& opt,
                                   int64_t seq) {
  const std::string what = fmt::format("bench prefill --layout {}", file.path().string());
  const auto block_size = file.metadata().find("block_size");
  MF_CHECK(block_size != file.metadata().end() &&
               block_size->second == std::to_string(opt.params.block_size),
           "{}: metadata \"block_size\" must be {} (--block-size)", what, opt.params.block_size);
  const std::string name = fmt::format("block_idx_{}", seq);
  const io::TensorInfo* info = file.find(name);
  MF_CHECK(info != nullptr && info->dtype == io::DType::kI64 && info->shape.size() == 2 &&
               info->shape[0] == opt.num_heads,
           "{}: needs an I64 tensor \"{}\" of shape [{}, k]", what, name, opt.num_heads);
  const std::span<const std::byte> bytes = file.data(*info);
  std::vector<int64_t> flat(static_cast<size_t>(info->numel()));
  std::memcpy(flat.data(), bytes.data(), bytes.size());
  return ops::layout_from_flat_blocks(flat.data(), opt.num_heads, info->shape[1], seq,
                                      opt.params.block_size, what.c_str());
}

// Blocks of the full causal layout.
int64_t dense_layout_blocks(int64_t num_heads, int64_t num_blocks) {
  return num_heads * num_blocks * (num_blocks + 1) / 2;
}

template <typename T>
T device_sum(const DeviceBuffer<T>& buffer) {
  const std::vector<T> host = buffer.download();
  return std::accumulate(host.begin(), host.end(), T{0});
}

// The fraction of the selection's (head, causal block) pairs it holds.
double density(const FlexPrefillDeviceSelection& selection) {
  return static_cast<double>(device_sum(selection.num_selected_blocks)) /
         static_cast<double>(dense_layout_blocks(selection.num_heads, selection.num_blocks));
}

// The fraction of (head, causal block) pairs that a and b (same shape) both select or both skip:
// one minus the size of the symmetric difference of their block sets over all causal blocks.
double selection_agreement(const ops::FlexPrefillSelection& a, const ops::FlexPrefillSelection& b) {
  const ops::BlockSparseLayout& x = a.layout;
  const ops::BlockSparseLayout& y = b.layout;
  const int64_t num_rows = x.num_heads * x.num_blocks;
  int64_t differ = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    // Both rows list their key blocks ascending: merge them, counting the unmatched ones.
    int64_t i = x.row_offsets[row], j = y.row_offsets[row];
    const int64_t i_end = x.row_offsets[row + 1], j_end = y.row_offsets[row + 1];
    while (i < i_end || j < j_end) {
      if (j == j_end || (i < i_end && x.col_idx[i] < y.col_idx[j])) {
        ++differ;
        ++i;
      } else if (i == i_end || y.col_idx[j] < x.col_idx[i]) {
        ++differ;
        ++j;
      } else {
        ++i;
        ++j;
      }
    }
  }
  const double causal_blocks = static_cast<double>(x.num_heads) *
                               static_cast<double>(x.num_blocks) *
                               static_cast<double>(x.num_blocks + 1) / 2.0;
  return 1.0 - static_cast<double>(differ) / causal_blocks;
}

// The SelectPath that PrefillBenchOptions::select_path names.
SelectPath select_path_of(const std::string& name) {
  MF_CHECK(name == "auto" || name == "many-blocks" || name == "clusters",
           "bench prefill: --select-path must be auto, many-blocks or clusters, got '{}'", name);
  if (name == "many-blocks") return SelectPath::many_blocks;
  return name == "clusters" ? SelectPath::clusters : SelectPath::automatic;
}

}  // namespace

void run_prefill_bench(const PrefillBenchOptions& options,
                       const std::function<void(const nlohmann::json&)>& emit) {
  PrefillBenchOptions opt = options;
  require_cuda_device();
  MF_CHECK(!opt.seqs.empty(), "bench prefill: --seq needs at least one length");
  MF_CHECK(opt.repeats > 0, "bench prefill: --repeats must be positive, got {}", opt.repeats);
  ops::check_flex_prefill_params(opt.params);
  const SelectPath select_path = select_path_of(opt.select_path);
  PrefillQkv dump;
  if (!opt.qkv_file.empty()) {
    dump = read_prefill_qkv(opt.qkv_file);
    opt.num_heads = dump.num_heads;
    opt.num_kv_heads = dump.num_kv_heads;
    opt.head_dim = dump.head_dim;
  }
  for (const int64_t seq : opt.seqs) {
    MF_CHECK(seq > 0, "bench prefill: --seq lengths must be positive, got {}", seq);
    MF_CHECK(opt.qkv_file.empty() || seq <= dump.num_positions,
             "bench prefill: --seq {} is longer than the {} positions of {}", seq,
             dump.num_positions, opt.qkv_file);
  }
  ops::check_sparse_attention_dims({opt.seqs[0], opt.num_heads, opt.num_kv_heads, opt.head_dim},
                                   "bench prefill");
  std::optional<io::SafetensorsFile> layout_file;
  if (!opt.layout_file.empty()) layout_file = io::SafetensorsFile::open(opt.layout_file);
  std::ofstream timeline_file;
  std::ostream* timeline = nullptr;
  if (!opt.timeline_file.empty()) {
    timeline_file = open_timeline_file(opt.timeline_file, "bench prefill");
    timeline = &timeline_file;
  }

  const nlohmann::json common{{"heads", opt.num_heads},
                              {"kv_heads", opt.num_kv_heads},
                              {"head_dim", opt.head_dim},
                              {"inputs", opt.qkv_file.empty() ? "random" : opt.qkv_file},
                              {"gamma", opt.params.gamma},
                              {"tau", opt.params.tau},
                              {"min_budget", opt.params.min_budget},
                              {"max_budget", opt.params.max_budget},
                              {"block_size", opt.params.block_size}};
  Attention cudnn;
  for (size_t i = 0; i < opt.seqs.size(); ++i) {
    const int64_t seq = opt.seqs[i];
    const ops::SparseAttentionDims dims{seq, opt.num_heads, opt.num_kv_heads, opt.head_dim};
    const Inputs in =
        make_inputs(opt, opt.qkv_file.empty() ? nullptr : &dump, seq, opt.seed + 10 * i);
    DeviceBuffer<bf16> out(in.q.size());
    DeviceBuffer<float> lse(static_cast<size_t>(opt.num_heads * seq));
    nlohmann::json entry = common;
    entry["seq"] = seq;
    fmt::print(stderr, "bench prefill: seq {} ({} of {})\n", seq, i + 1, opt.seqs.size());

    time_into(entry, "dense_cudnn", opt.repeats, timeline, [&] {
      cudnn.forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(),
                    AttentionShape{1, seq, opt.num_heads, opt.num_kv_heads, opt.head_dim}, nullptr);
    });
    const DeviceBlockSparseLayoutBuffers dense =
        upload_layout(ops::dense_causal_layout(opt.num_heads, seq, opt.params.block_size));
    time_into(entry, "dense_ours", opt.repeats, timeline, [&] {
      block_sparse_attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(),
                                     dense.view(), dims, nullptr);
    });
    // The sm_80 tensor-core kernel beside the automatic choice (the Hopper kernel on sm_90).
    time_into(entry, "dense_mma_sync", opt.repeats, timeline, [&] {
      block_sparse_attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(),
                                     dense.view(), dims, nullptr, BlockSparseKernel::tensor_core);
    });

    if (layout_file) {
      const ops::BlockSparseLayout given = read_layout(*layout_file, opt, seq);
      const DeviceBlockSparseLayoutBuffers buffers = upload_layout(given);
      time_into(entry, "layout", opt.repeats, timeline, [&] {
        block_sparse_attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(),
                                       in.v.data(), buffers.view(), dims, nullptr);
      });
      const double layout_density =
          static_cast<double>(given.col_idx.size()) /
          static_cast<double>(dense_layout_blocks(opt.num_heads, given.num_blocks));
      entry["layout_density"] = layout_density;
      if (entry.contains("layout_ms") && entry.contains("dense_ours_ms")) {
        entry["layout_block_cost_over_dense_ours"] =
            entry["layout_ms"].get<double>() /
            (layout_density * entry["dense_ours_ms"].get<double>());
      }
    }

    // Both pattern searches are timed; the one --flex-search names feeds the sparse attention.
    ops::FlexPrefillParams exact_params = opt.params, fast_params = opt.params;
    exact_params.search = ops::FlexSearch::kExact;
    fast_params.search = ops::FlexSearch::kFp32;
    FlexPrefillDeviceSelection exact, fast;
    time_into(entry, "flex_select", opt.repeats, timeline, [&] {
      flex_prefill_select(exact, in.q.data(), in.k.data(), dims, exact_params, nullptr);
    });
    time_into(entry, "flex_select_fast", opt.repeats, timeline, [&] {
      flex_prefill_select(fast, in.q.data(), in.k.data(), dims, fast_params, nullptr, select_path);
    });
    entry["select_path"] = opt.select_path;
    if (entry.contains("flex_select_ms") && entry.contains("flex_select_fast_ms")) {
      entry["search_agreement"] =
          selection_agreement(download_selection(exact), download_selection(fast));
      entry["density_fast"] = density(fast);
      entry["query_aware_heads_fast"] = device_sum(fast.query_aware);
    }
    const bool use_fast = opt.params.search == ops::FlexSearch::kFp32;
    entry["flex_search"] = ops::flex_search_name(opt.params.search);
    const char* select_key = use_fast ? "flex_select_fast_ms" : "flex_select_ms";
    if (entry.contains(select_key)) {
      const FlexPrefillDeviceSelection& selection = use_fast ? fast : exact;
      const DeviceBlockSparseLayout view{selection.row_offsets.data(), selection.col_idx.data(),
                                         selection.num_heads, selection.num_blocks,
                                         selection.block_size};
      time_into(entry, "flex_attention", opt.repeats, timeline, [&] {
        block_sparse_attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(),
                                       in.v.data(), view, dims, nullptr);
      });
      entry["dense_fallback"] = selection.dense_fallback;
      entry["density"] = density(selection);
      entry["query_aware_heads"] = device_sum(selection.query_aware);
    }
    const auto ms = [&](const char* key) {
      return entry.contains(key) ? entry[key].get<double>() : -1.0;
    };
    const double cudnn_ms = ms("dense_cudnn_ms"), exact_ms = ms("flex_select_ms");
    const double fast_ms = ms("flex_select_fast_ms"), select_ms = ms(select_key);
    const double flex_ms = ms("flex_attention_ms"), ours_ms = ms("dense_ours_ms");
    if (cudnn_ms > 0 && exact_ms > 0) entry["select_over_dense_cudnn"] = exact_ms / cudnn_ms;
    if (cudnn_ms > 0 && fast_ms > 0) entry["select_fast_over_dense_cudnn"] = fast_ms / cudnn_ms;
    if (cudnn_ms > 0 && select_ms > 0 && flex_ms > 0) {
      entry["flex_speedup_over_dense_cudnn"] = cudnn_ms / (select_ms + flex_ms);
    }
    if (ours_ms > 0 && flex_ms > 0 && entry.contains("density")) {
      // Time per computed block of the sparse kernel against its dense run (1 = no overhead).
      entry["flex_block_cost_over_dense_ours"] =
          flex_ms / (entry["density"].get<double>() * ours_ms);
    }
    if (cudnn_ms > 0 && ours_ms > 0) {
      // Our dense run's throughput per block as a fraction of cuDNN's (the same causal work), and
      // both as TFLOP/s of the causal attention's 4 * heads * head_dim * N (N + 1) / 2 flops.
      entry["dense_ours_over_cudnn"] = cudnn_ms / ours_ms;
      const double tflop = 2.0 * static_cast<double>(opt.num_heads * opt.head_dim) *
                           static_cast<double>(seq) * static_cast<double>(seq + 1) * 1e-12;
      entry["dense_cudnn_tflops"] = tflop / (cudnn_ms * 1e-3);
      entry["dense_ours_tflops"] = tflop / (ours_ms * 1e-3);
    }
    emit(entry);
  }
}

}  // namespace moeforge::cuda
