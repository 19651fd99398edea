// The training run's configuration: a JSON file with one section per concern, plus
// `--set key.path=value` overrides. Unknown keys are errors (they list the valid keys), every
// validation message names the key path, and the config is written back into checkpoints.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// "model": what to train. Exactly one of model_config and init_from is set.
struct InitConfig {
  std::filesystem::path model_config;  // HF config.json (relative: against the config's folder)
  std::filesystem::path init_from;     // checkpoint/model dir to take the weights from
  uint64_t seed = 1234;                // weight init
  double init_std = 0.02;
  bool operator==(const InitConfig&) const = default;
};

// "data": the prepared dataset and the batch shape.
struct TrainDataConfig {
  std::filesystem::path dataset;  // dir from `moeforge data prepare` (relative: like model_config)
  int64_t seq_len = 256;
  int64_t micro_batch_size = 8;
  int64_t grad_accum_steps = 1;
  uint64_t seed = 42;  // data order
  // How the splits are cut into windows (data/windows.h): "stream", "packed" or "single".
  std::string windows = "stream";
  bool operator==(const TrainDataConfig&) const = default;
};

// "optimizer": AdamW.
struct OptimizerConfig {
  double lr = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  // Parameters whose name contains any of these substrings get no weight decay.
  std::vector<std::string> no_decay = {"norm", "embed_tokens", "bias"};
  double grad_clip = 1.0;  // max global gradient norm; 0: off
  // A non-finite loss or gradient: "stop" the run (default) or "skip" the update of that step.
  // Either way it is reported with the step and the first tensor whose gradient went bad.
  std::string on_nonfinite = "stop";
  bool operator==(const OptimizerConfig&) const = default;
};

enum class ScheduleType { kConstant, kCosine, kWsd };
// Shape of the WSD decay as a function of progress p in (0, 1]: 1 - p, (1 + cos(pi p)) / 2, or
// 1 - sqrt(p) ("1-sqrt" of the WSD papers).
enum class DecayShape { kLinear, kCosine, kSqrt };

// "schedule": the learning-rate schedule (see train/lr_schedule.h for the formulas).
struct ScheduleConfig {
  ScheduleType type = ScheduleType::kCosine;
  int64_t warmup_steps = 0;
  int64_t max_steps = 0;  // required, > 0
  double min_lr_ratio = 0.1;
  // WSD only: the decay phase is the last decay_steps steps, or the last decay_fraction of
  // max_steps; at most one of the two is set (neither: decay_fraction 0.2).
  std::optional<int64_t> decay_steps;
  std::optional<double> decay_fraction;
  DecayShape decay_shape = DecayShape::kLinear;
  bool operator==(const ScheduleConfig&) const = default;
};

// "checkpoint"
struct CheckpointConfig {
  std::filesystem::path dir = "runs/default";  // the run dir
  int64_t every_steps = 0;                     // 0: only at the end
  int64_t keep_last = 0;                       // 0: keep all
  bool operator==(const CheckpointConfig&) const = default;
};

// "eval"
struct EvalConfig {
  int64_t every_steps = 0;   // 0: only at the end
  int64_t max_batches = 16;  // windows scored: max_batches x micro-batch, spread over val
  bool operator==(const EvalConfig&) const = default;
};

// "log"
struct LogConfig {
  int64_t every_steps = 1;
  std::filesystem::path metrics_file;  // empty in the file: <checkpoint.dir>/metrics.jsonl
  bool operator==(const LogConfig&) const = default;
};

// "pma": checkpoint merging during training (../shared/docs/pma.md). Checkpoints are kept every
// interval_tokens tokens; every every_steps steps the last count of them (spaced interval_tokens
// apart) are merged in a background thread into <checkpoint.dir>/pma/latest, and the merged
// model's validation loss is logged next to the current model's.
struct PmaConfig {
  bool enabled = false;
  int64_t interval_tokens = 0;  // V; a multiple of the tokens of one step
  int64_t every_steps = 0;      // M
  int64_t count = 10;           // N
  std::string method = "sma";   // sma | ema | wma
  double alpha = 0.2;           // EMA only
  bool operator==(const PmaConfig&) const = default;
};

// Groups of expert_parallel consecutive ranks share each sequence (each holds seq_len / n
// positions of the residual stream) and split every layer as layout says; the world size divided
// by expert_parallel is the data-parallel degree.
struct ParallelConfig {
  int64_t expert_parallel = 1;  // n = sp = ep, or the tensor-parallel size under layout "tp"
  // "sp_ep": MegaScale-MoE's layout, Ulysses attention (sequence parallelism) and the experts of
  // every MoE layer split over the group (expert parallelism). "tp": Megatron-LM's tensor
  // parallelism with sequence-parallel norms, the baseline of the paper's ablation: attention
  // heads and FFN intermediate columns split over the group (model/tensor_parallel.h).
  std::string layout = "sp_ep";
  // The gradient sum over ranks: "fp32", or "bf16" (MegaScale-MoE's compressed all-to-all with an
  // fp32 local sum; train/grad_reduce.h).
  std::string grad_reduce_dtype = "fp32";
  // The CUDA engine sums the last micro-batch's gradients in buckets of this many MiB (of fp32
  // gradient) on a stream of their own as its backward finishes them, overlapped with the
  // backward of earlier layers; 0: one sum after the backward. The CPU engines ignore it. 512:
  // the best of 64-1024 on two H200s for configs/bench/moe-1.8b-a0.4b.json (docs/benchmarks.md,
  // session 11): fewer, larger buckets contend less with the backward's kernels.
  double grad_bucket_mb = 512.0;
  // How each MoE layer reaches the experts of other ranks under layout "sp_ep": "allgather"
  // (all-gather -> local experts -> reduce-scatter), "alltoall" (each token's top-k rows to their
  // experts' ranks and back) or "auto" (all-to-all iff top-k < expert_parallel, the smaller
  // volume; model/moe_ffn.h), for every MoE layer, or a comma-separated list of those names with
  // one per decoder layer (e.g. "alltoall,allgather"; dense layers' entries are unused). Layout
  // "tp" has one way (all-gather): leave it "auto".
  std::string ep_dispatch = "auto";
  // The dtype of the GPU engine's expert-parallel MoE exchanges of fp32 activations under
  // "sp_ep": "fp32", or "bf16" (MegaScale-MoE section 3's compression: the forward's reduce-
  // scatter of the partial expert outputs and the backward's reduce-scatter of the input gradient
  // become one cast to bf16, an all-to-all and a rank-ordered fp32 sum; the backward's all-gather
  // of the output gradient travels in bf16; half the bytes). It applies to the layers of the
  // all-gather dispatch: those of the all-to-all dispatch exchange bf16 rows either way. The CPU
  // engine takes "fp32" only.
  std::string ep_comm_dtype = "fp32";
  // The GPU engine's overlap of those exchanges with the experts under "sp_ep": each MoE layer
  // runs in this many chunks of every rank's tokens, one chunk's all-gather and reduce-scatter
  // overlapping another's experts (MegaScale-MoE section 2's inter-operator overlap); 1 (the
  // default, the fastest measured on 2 H200s: docs/benchmarks.md, session 13): one exchange
  // before and one after the experts. More than 1 needs model capacity_factor 0 (token dropping
  // ranks the whole group's tokens) and the all-gather dispatch in every MoE layer (the GPU
  // engine refuses it otherwise). A step uses the largest divisor of it that divides each rank's
  // tokens. The CPU engine runs unchunked.
  int64_t ep_overlap_chunks = 1;
  // 0: every rank holds AdamW's whole state; 1: ZeRO-1, the state sharded over the data-parallel
  // ranks (train/zero_optimizer.h; on GPUs cuda/gpu_zero_adamw.h).
  int64_t zero_stage = 0;
  bool operator==(const ParallelConfig&) const = default;
};

struct TrainConfig {
  InitConfig model;
  TrainDataConfig data;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  CheckpointConfig checkpoint;
  EvalConfig eval;
  LogConfig log;
  PmaConfig pma;
  ParallelConfig parallel;
  bool operator==(const TrainConfig&) const = default;
};

// Upper bounds that keep the step and token arithmetic of training within int64_t; validation
// rejects configs beyond them, naming the fields.
inline constexpr int64_t kMaxTrainSteps = int64_t{1} << 40;  // schedule.max_steps
// The tokens on one rank of the whole run, of one evaluation and of the span of one PMA merge.
inline constexpr int64_t kMaxTrainTokens = int64_t{1} << 50;

// Reads the JSON file, applies the overrides ("key.path=value"; the value is parsed as JSON when
// it parses, else taken as a string) and validates. Relative model.model_config, model.init_from
// and data.dataset are made absolute: against the file's folder, or against the working directory
// when an override sets them.
TrainConfig load_train_config(const std::filesystem::path& path,
                              const std::vector<std::string>& overrides = {});
// Merges j over the defaults (unknown keys are errors), resolves relative paths against base_dir
// and validates. An empty log.metrics_file becomes <checkpoint.dir>/metrics.jsonl.
TrainConfig train_config_from_json(const nlohmann::json& j, const std::filesystem::path& base_dir);
// Every field (saved into checkpoints): train_config_from_json(train_config_to_json(c), dir) == c
// when c's paths are absolute (as load_train_config makes them) or dir is empty.
nlohmann::json train_config_to_json(const TrainConfig& config);
// Throws moeforge::Error naming the key path of the first invalid field.
void validate_train_config(const TrainConfig& config);

// The number of steps of the WSD decay phase (decay_steps, or decay_fraction * max_steps rounded,
// at least 1).
int64_t wsd_decay_steps(const ScheduleConfig& schedule);

}  // namespace moeforge
