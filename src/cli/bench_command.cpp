// `moeforge bench train`: training-step throughput of a model config with random tokens, on one
// GPU or (under mpirun) data-parallel over several with the gradients summed through NCCL, in
// groups of GPUs that split each layer as MegaScale-MoE does (sp_ep) or as Megatron-LM does (tp,
// the ablation's baseline): tokens/s, MFU (the anchors.md formula), peak device memory and the
// GPU time per phase.
// `moeforge bench gemm`: the kernel lab of the expert GEMMs (cuda/gemm_lab.h).
// `moeforge bench prefill`: dense against FlexPrefill prefill attention (cuda/prefill_bench.h).
// `moeforge bench comm` lives in bench_comm_command.cpp.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "cli/attention_options.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda/gemm_lab.h"
#include "cuda/prefill_bench.h"
#include "model/model_config.h"
#include "model/parameters.h"
#include "train/train_config.h"

#if MOEFORGE_HAVE_CUDA
#include "comm/communicator.h"
#include "comm/local_rank.h"
#include "cuda/bucketed_grad_reducer.h"
#include "cuda/device_communicator.h"
#include "cuda/device_info.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_adamw.h"
#include "cuda/gpu_transformer.h"
#include "cuda/gpu_zero_adamw.h"
#include "cuda/kernel_timeline.h"
#include "cuda/random_fill.h"
#include "model/moe_ffn.h"
#include "model/tensor_parallel.h"
#include "train/grad_reduce.h"
#endif

namespace moeforge::cli {
namespace {

struct BenchOptions {
  std::string config;
  int64_t steps = 10;
  int64_t warmup = 3;
  int64_t micro_batch = 4;
  int64_t seq = 4096;
  uint64_t seed = 1234;
  double peak_tflops = 989.0;
  std::string recompute = "none";
  std::string grad_reduce = "fp32";
  std::string ep_comm = "fp32";
  int64_t ep_overlap_chunks = ParallelConfig{}.ep_overlap_chunks;  // the trainer's default
  std::string ep_dispatch = "allgather";  // what bench train ran before the all-to-all dispatch
  double grad_bucket_mb = ParallelConfig{}.grad_bucket_mb;  // the trainer's default
  int64_t expert_parallel = 1;
  std::string layout = "sp_ep";  // how each group of expert_parallel GPUs splits a layer
  bool overlap_optimizer = false;
  bool cuda_graphs = false;
  int64_t zero_stage = 0;
  std::string kernel_timeline;  // where to write a CUPTI timeline of one more step
};

#if MOEFORGE_HAVE_CUDA
// "cublaslt_per_expert", or "cutlass_grouped:" and the configuration of each product (forward,
// backward_input, backward_weight).
std::string expert_gemms_name(const cuda::GpuTransformer& model) {
  if (!model.grouped_expert_gemms()) return "cublaslt_per_expert";
  const cuda::GroupedGemmKernels& k = model.grouped_gemm_kernels();
  return fmt::format("cutlass_grouped:{},{},{}", cuda::grouped_gemm_kernel_name(k.forward),
                     cuda::grouped_gemm_kernel_name(k.backward_input),
                     cuda::grouped_gemm_kernel_name(k.backward_weight));
}

// The dispatch each MoE layer ran (describe_ep_dispatch).
std::string ep_dispatch_run(const cuda::GpuTransformer& model) {
  const ModelConfig& config = model.config();
  std::vector<std::optional<EpDispatch>> runs(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    if (config.layer_is_moe(l)) runs[static_cast<size_t>(l)] = model.expert_dispatch(l);
  }
  return describe_ep_dispatch(runs);
}

void run_bench_train(const BenchOptions& opt) {
  const ModelConfig config = load_model_config(opt.config);
  MF_CHECK(opt.steps > 0 && opt.warmup >= 0, "--steps must be positive and --warmup >= 0");
  MF_CHECK(opt.micro_batch > 0 && opt.seq > 1, "--micro-batch must be positive and --seq > 1");
  const GradReduceDtype reduce_dtype = parse_grad_reduce_dtype(opt.grad_reduce);
  const EpDispatchPlan ep_dispatch = parse_ep_dispatch_plan(opt.ep_dispatch, config.num_layers);
  MF_CHECK(opt.grad_bucket_mb >= 0.0 && opt.grad_bucket_mb <= 65536.0,
           "--grad-bucket-mb must be in [0, 65536], got {}", opt.grad_bucket_mb);
  const auto bucket_elems =
      static_cast<size_t>(opt.grad_bucket_mb * 1024.0 * 1024.0) / sizeof(float);
  // Under mpirun, one GPU per rank (local rank % GPUs of the host): groups of expert_parallel
  // consecutive ranks share each sequence (the trainer's layout), the groups are data-parallel,
  // and each step sums the gradients over the world through NCCL.
  Communicator& world = world_communicator();
  const int64_t ep = opt.expert_parallel;
  const bool tp = parse_parallel_layout(opt.layout) == ParallelLayout::kTensor;
  if (tp) {
    // What the trainer's GPU engine refuses under parallel.layout "tp" too.
    MF_CHECK(opt.zero_stage == 0, "--zero-stage 1 runs with --layout sp_ep only");
    MF_CHECK(
        !opt.cuda_graphs,
        "--cuda-graphs runs with --layout sp_ep only (--layout tp runs its exchanges eagerly)");
    MF_CHECK(opt.ep_comm == "fp32" && opt.ep_overlap_chunks == 1 && opt.ep_dispatch == "allgather",
             "--ep-comm-dtype, --ep-overlap-chunks and --ep-dispatch set --layout sp_ep's expert "
             "exchanges; leave them at their defaults with --layout tp");
  }
  MF_CHECK(opt.zero_stage == 0 || (ep == 1 && !opt.overlap_optimizer),
           "--zero-stage 1 runs with --expert-parallel 1 and without --overlap-optimizer");
  MF_CHECK(!opt.cuda_graphs || (ep == 1 && !opt.overlap_optimizer),
           "--cuda-graphs runs with --expert-parallel 1 and without --overlap-optimizer");
  MF_CHECK(ep >= 1 && world.size() % ep == 0 && opt.seq % ep == 0,
           "--expert-parallel ({}) must divide the number of ranks ({}) and --seq ({})", ep,
           world.size(), opt.seq);
  cuda::bind_device_to_local_rank(local_rank_from_environment());
  // The kernel timeline's file (each rank's own under mpirun), checked before the steps.
  std::ofstream timeline_file;
  if (!opt.kernel_timeline.empty()) {
    timeline_file = cuda::open_timeline_file(
        world.size() > 1 ? fmt::format("{}.rank{}", opt.kernel_timeline, world.rank())
                         : opt.kernel_timeline,
        "bench train");
  }
  cuda::DeviceAllocator::instance().reset_peak();
  // Under expert parallelism each GPU holds its group's share of the experts only; under tensor
  // parallelism the whole model (it uses its slices).
  const ExpertShard experts =
      ep > 1 && config.is_moe() && !tp ? ExpertShard{world.rank() % ep, ep} : ExpertShard{};
  cuda::GpuTransformer model(config, cuda::parse_recompute(opt.recompute), experts);
  std::unique_ptr<Communicator> ep_host, ep_device;
  if (ep > 1) {
    ep_host = world.split(static_cast<int>(world.rank() / ep), world.rank());
    std::string why_not;
    ep_device = cuda::make_device_communicator(*ep_host, model.stream(), &why_not);
    MF_CHECK(ep_device != nullptr,
             "--expert-parallel {} exchanges activations through NCCL, but {}", ep, why_not);
    if (tp) {
      model.set_tensor_parallel_group(*ep_device);
    } else {
      model.set_expert_parallel_group(
          *ep_device, {parse_grad_reduce_dtype(opt.ep_comm), opt.ep_overlap_chunks, ep_dispatch});
    }
  }
  if (opt.cuda_graphs) model.set_cuda_graphs(true);
  const int64_t local_seq = opt.seq / ep;
  const ParameterLayout& layout = model.layout();
  const bool root = world.rank() == 0;
  if (root) {
    fmt::print(stderr,
               "bench train: {} parameters ({} active), {} x {} tokens per step and group on {} "
               "GPU(s), {} per group (layout {})\n",
               layout.num_model_params(), layout.num_active_params(), opt.micro_batch, opt.seq,
               world.size(), ep, opt.layout);
  }
  // Weights made on the device (init_random_params's rules with uniform instead of normal
  // values): the host's normal draws took over a minute for 1.8B parameters.
  for (const ParamSpec& spec : layout.specs()) {
    float* w = model.params() + spec.offset;
    if (is_norm_param(spec.name)) {
      cuda::fill_constant_f32(w, spec.numel, 1.0f, model.stream());
    } else if (spec.shape.size() == 1) {
      cuda::fill_constant_f32(w, spec.numel, 0.0f, model.stream());
    } else {
      cuda::fill_uniform_f32(w, spec.numel, opt.seed + static_cast<uint64_t>(spec.offset), 0.02f,
                             model.stream());
    }
  }
  model.refresh_bf16_params();
  // The trainer's CUDA engines' schemes. Without ZeRO: buckets summed on the reducer's stream as
  // the backward finishes them (bucket_elems 0: one sum after the backward), then AdamW on every
  // weight. With ZeRO-1: fp32 buckets summed onto their shard owners on the reducer's stream
  // beside the backward (bf16, or bucket_elems 0: a reduce-scatter on the model's stream after
  // it), AdamW on this rank's shard, the all-gathers of the updated weights.
  // With sharded experts (the trainer's scheme): after the backward, the replicated ranges summed
  // over the world and the expert ranges over the data-parallel group (the GPUs holding the same
  // experts).
  cuda::BucketedGradReducer reducer;
  std::unique_ptr<Communicator> dp, owner_sums, dp_host, expert_dp;
  const auto device_comm = [&](Communicator& host, cudaStream_t stream) {
    std::string why_not;
    std::unique_ptr<Communicator> comm = cuda::make_device_communicator(host, stream, &why_not);
    MF_CHECK(comm != nullptr, "bench train over {} ranks sums the gradients through NCCL, but {}",
             host.size(), why_not);
    return comm;
  };
  if (world.size() > 1 || opt.zero_stage == 1) {
    dp = device_comm(world, opt.zero_stage == 1 ? model.stream() : reducer.stream());
  }
  if (opt.zero_stage == 1 && world.size() > 1 && bucket_elems > 0 &&
      reduce_dtype == GradReduceDtype::kFloat32) {
    owner_sums = device_comm(world, reducer.stream());
  }
  const bool sharded = layout.experts_sharded();
  if (sharded && world.size() > ep) {
    dp_host = world.split(static_cast<int>(world.rank() % ep), world.rank());
    expert_dp = device_comm(*dp_host, reducer.stream());
  }
  std::unique_ptr<cuda::GpuAdamW> optimizer;
  std::unique_ptr<cuda::GpuZeroAdamW> zero;
  if (opt.zero_stage == 1) {
    zero = std::make_unique<cuda::GpuZeroAdamW>(model, AdamWHyper{},
                                                std::vector<std::string>{"norm", "bias"}, *dp);
  } else {
    optimizer = std::make_unique<cuda::GpuAdamW>(model, AdamWHyper{},
                                                 std::vector<std::string>{"norm", "bias"},
                                                 sharded ? ep_host.get() : nullptr);
    if (opt.overlap_optimizer) optimizer->enable_overlap();
    if (opt.cuda_graphs) optimizer->set_cuda_graphs(true);
  }
  const int64_t n = opt.micro_batch * local_seq;  // this rank's tokens
  Rng data_rng(opt.seed + 1 + static_cast<uint64_t>(world.rank()));
  std::vector<int32_t> tokens(static_cast<size_t>(n + 1));

  auto step = [&]() {
    for (auto& t : tokens) t = static_cast<int32_t>(data_rng.below(config.vocab_size));
    // One micro-batch: its backward assigns the gradients (no zeroing pass). With the timer on,
    // the optimizer (grad norm with its host round trip, AdamW) is a phase of its own.
    if (dp && !zero && !sharded) {
      reducer.begin(model.grads(), model.grad_ready_ranges(), bucket_elems, *dp, reduce_dtype);
    } else if (owner_sums) {
      reducer.begin(model.grads(), model.grad_ready_ranges(), bucket_elems, *owner_sums,
                    reduce_dtype, zero->shard_len());
    }
    // Not beside the expert-parallel collectives (GpuStepEngine::begin_grad_reduce says why),
    // nor with CUDA graphs (a graph cannot call the hook).
    if (reducer.active() && bucket_elems > 0 && ep == 1 && !opt.cuda_graphs) {
      model.set_grad_ready_hook([&](size_t index) { reducer.ready(index, model.stream()); });
    }
    const LossBreakdown loss = model.forward_backward(
        tokens.data(), tokens.data() + 1, opt.micro_batch, local_seq, 1.0, cuda::GradMode::kAssign);
    if (zero && reducer.active()) {
      model.timer().mark("grad_reduce", model.stream());
      model.set_grad_ready_hook(nullptr);
      reducer.finish(model.stream());
      zero->use_owner_reduced_gradients();
    } else if (zero) {
      if (world.size() > 1) model.timer().mark("grad_reduce", model.stream());
      zero->reduce_gradients(reduce_dtype);
    } else if (dp && sharded) {
      model.timer().mark("grad_reduce", model.stream());
      reducer.sum_ranges(model.grads(), layout.replicated_ranges(), *dp, reduce_dtype,
                         model.stream());
      if (expert_dp) {
        reducer.sum_ranges(model.grads(), layout.expert_ranges(), *expert_dp, reduce_dtype,
                           model.stream());
      }
    } else if (dp) {
      // The phase is what the sums add after the backward: all of them without buckets, the
      // ones still running (the first layers' and the embedding's, finished last) with.
      model.timer().mark("grad_reduce", model.stream());
      model.set_grad_ready_hook(nullptr);
      reducer.finish(model.stream());
    }
    // With ZeRO-1 the phase holds the all-gather of the weights too.
    model.timer().mark("optimizer", model.stream());
    if (zero) {
      zero->step(1e-4, 1.0);
    } else {
      optimizer->step(1e-4, 1.0);
    }
    model.timer().flush(model.stream());
    model.synchronize();
    return loss;
  };

  std::vector<double> step_ms;
  LossBreakdown loss;
  for (int64_t i = 0; i < opt.warmup + opt.steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    loss = step();
    const auto t1 = std::chrono::steady_clock::now();
    if (i >= opt.warmup) {
      step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    if (root) {
      fmt::print(stderr, "step {}/{}: loss {:.4f}, {:.1f} ms\n", i + 1, opt.warmup + opt.steps,
                 loss.loss, std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  // Phase breakdown from two more steps with events (kept out of the timed steps).
  model.timer().set_enabled(true);
  for (int i = 0; i < 2; ++i) step();
  model.timer().set_enabled(false);
  if (timeline_file.is_open()) {
    cuda::KernelTimeline recording;
    step();
    cuda::write_timeline_jsonl(timeline_file, recording.finish(),
                               {{"seq", opt.seq}, {"part", "train_step"}, {"rank", world.rank()}});
  }

  std::vector<double> sorted = step_ms;
  std::sort(sorted.begin(), sorted.end());
  // Every rank's median step; the slowest sets the data-parallel rate.
  double median_ms = sorted[sorted.size() / 2];
  std::vector<double> rank_medians(static_cast<size_t>(world.size()));
  world.all_gather(&median_ms, rank_medians.data(), 1);
  median_ms = *std::max_element(rank_medians.begin(), rank_medians.end());
  const double tokens_per_s = static_cast<double>(n) / (median_ms / 1000.0);
  const double flops_per_token =
      6.0 * static_cast<double>(layout.num_active_params()) +
      6.0 * static_cast<double>(config.num_layers * opt.seq * config.hidden_size);
  const double mfu = tokens_per_s * flops_per_token / (opt.peak_tflops * 1e12);
  nlohmann::json phases = nlohmann::json::object();
  for (const auto& [name, ms] : model.timer().totals_ms()) phases[name] = ms / 2.0;
  nlohmann::json out{
      {"config", opt.config},
      {"recompute", opt.recompute},
      {"expert_gemms", expert_gemms_name(model)},
      {"num_params", layout.num_model_params()},
      {"params_per_gpu", layout.num_params()},
      {"num_active_params", layout.num_active_params()},
      {"ranks", world.size()},
      {"expert_parallel", ep},
      {"layout", opt.layout},
      {"ep_comm_dtype", ep > 1 && !tp ? opt.ep_comm : "none"},
      {"ep_overlap_chunks", model.expert_overlap_chunks()},
      {"ep_dispatch", ep > 1 && !tp ? ep_dispatch_run(model) : "none"},
      {"overlap_optimizer", opt.overlap_optimizer},
      {"cuda_graphs", opt.cuda_graphs},
      {"graph_captures", model.graph_captures() + (optimizer ? optimizer->graph_captures() : 0)},
      {"zero_stage", opt.zero_stage},
      {"grad_reduce", world.size() > 1 ? opt.grad_reduce : "none"},
      {"grad_bucket_mb", opt.grad_bucket_mb},
      {"tokens_per_step", n * world.size()},
      {"rank_median_step_ms", rank_medians},
      {"steps", opt.steps},
      {"median_step_ms", median_ms},
      {"min_step_ms", sorted.front()},
      {"tokens_per_s", tokens_per_s * static_cast<double>(world.size())},
      {"tokens_per_s_per_gpu", tokens_per_s},
      {"mfu", mfu},
      {"peak_memory_gib",
       static_cast<double>(cuda::DeviceAllocator::instance().peak_bytes_in_use()) / (1 << 30)},
      {"loss", loss.loss},
      {"phase_ms", phases},
  };
  if (root) fmt::print("{}\n", out.dump());
}
#endif

}  // namespace

void register_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand(
      "bench", "Benchmarks on the GPU, and the communication volume of parallel layouts");
  bench->require_subcommand(1);
  add_bench_comm_command(*bench);
  auto opt = std::make_shared<BenchOptions>();
  CLI::App* train = bench->add_subcommand(
      "train",
      "Time training steps (forward, backward, AdamW) of a model config on one GPU with random "
      "tokens, or under mpirun data-parallel on one GPU per rank (gradients summed through "
      "NCCL), in groups of --expert-parallel GPUs as --layout says; prints one JSON line: tokens/s "
      "(all GPUs, and per GPU from the slowest rank's "
      "median step), MFU per GPU = tokens/s per GPU * (6 * active params + 6 * layers * seq * "
      "hidden) / peak, peak device memory, GPU ms per phase");
  train
      ->add_option("--config", opt->config,
                   "Model config.json (e.g. configs/bench/moe-1.8b-a0.4b.json)")
      ->required()
      ->check(CLI::ExistingFile);
  train->add_option("--steps", opt->steps, "Timed steps (the median is reported)")
      ->capture_default_str();
  train->add_option("--warmup", opt->warmup, "Untimed steps first")->capture_default_str();
  train->add_option("--micro-batch", opt->micro_batch, "Sequences per step")->capture_default_str();
  train->add_option("--seq", opt->seq, "Tokens per sequence")->capture_default_str();
  train->add_option("--seed", opt->seed, "Seed of the weights and tokens")->capture_default_str();
  train
      ->add_option("--peak-tflops", opt->peak_tflops, "Peak bf16 TFLOP/s for MFU (H200 dense: 989)")
      ->capture_default_str();
  train
      ->add_option("--recompute", opt->recompute,
                   "Activation recompute: none, or selective (normed inputs and SwiGLU output)")
      ->check(CLI::IsMember({"none", "selective"}))
      ->capture_default_str();
  train
      ->add_option("--grad-reduce", opt->grad_reduce,
                   "Under mpirun (data-parallel, one GPU per rank): the gradient sum through "
                   "NCCL, fp32 or bf16 (compressed all-to-all with an fp32 local sum)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
  train
      ->add_option("--ep-comm-dtype", opt->ep_comm,
                   "With --expert-parallel: the dtype of the MoE exchanges of fp32 activations "
                   "(parallel.ep_comm_dtype), fp32 or bf16 (compressed: the reduce-scatters a bf16 "
                   "all-to-all with an fp32 local sum, the output gradient gathered in bf16)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
  train
      ->add_option("--ep-overlap-chunks", opt->ep_overlap_chunks,
                   "With --expert-parallel: each MoE layer in this many chunks of the tokens, one "
                   "chunk's exchanges overlapping another's experts (parallel.ep_overlap_chunks)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  train
      ->add_option("--ep-dispatch", opt->ep_dispatch,
                   "With --expert-parallel: how the MoE layers reach the experts of other GPUs "
                   "(parallel.ep_dispatch): allgather, alltoall, auto (all-to-all iff top-k < "
                   "--expert-parallel), or one per decoder layer, comma-separated")
      ->capture_default_str();
  train
      ->add_option("--expert-parallel", opt->expert_parallel,
                   "Under mpirun: groups of this many GPUs share each sequence (--seq positions "
                   "split over the group; with --layout sp_ep Ulysses attention and 1/N of the "
                   "experts each, with --layout tp 1/N of the heads and FFN columns), the groups "
                   "data-parallel (the gradient sums then run after the backward)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  train
      ->add_option("--layout", opt->layout,
                   "How each group of --expert-parallel GPUs splits a layer (parallel.layout): "
                   "sp_ep (MegaScale-MoE: sequence-parallel attention, expert-parallel experts) or "
                   "tp (the Megatron-LM baseline of MegaScale-MoE's ablation: attention heads and "
                   "every FFN's and expert's columns split between all-gathers and "
                   "reduce-scatters along the sequence, no overlap; every GPU holds the whole "
                   "model, so its grad_reduce and optimizer phases cover every weight where "
                   "Megatron-LM's would cover 1/N of the split ones; not with --zero-stage 1, "
                   "--cuda-graphs or the --ep-* options)")
      ->check(CLI::IsMember({"sp_ep", "tp"}))
      ->capture_default_str();
  train->add_flag("--overlap-optimizer", opt->overlap_optimizer,
                  "Run AdamW on a stream of its own, range by range, overlapped with the next "
                  "step's forward (GpuAdamW::enable_overlap; experimental, not in `train` yet)");
  train->add_flag("--cuda-graphs", opt->cuda_graphs,
                  "Replay each step as captured CUDA graphs: the forward and backward, and "
                  "without --zero-stage 1 the optimizer's norm and update (the first warm-up step "
                  "runs eagerly, the second captures; the model's part of the two phase-timed "
                  "steps runs eagerly)");
  train
      ->add_option("--zero-stage", opt->zero_stage,
                   "1: ZeRO-1 as the trainer's parallel.zero_stage 1 runs it on GPUs (fp32 "
                   "gradients summed onto their shard owners through NCCL in buckets beside the "
                   "backward, bf16 ones reduce-scattered after it; AdamW on this rank's 1/N "
                   "shard, the weights all-gathered in bf16 and in fp32 where read in fp32); 0: "
                   "every rank updates all weights")
      ->check(CLI::Range(0, 1))
      ->capture_default_str();
  train
      ->add_option("--grad-bucket-mb", opt->grad_bucket_mb,
                   "Under mpirun: the gradient sums start in buckets of this many MiB as the "
                   "backward finishes them, overlapped with it (0: one sum after the backward)")
      ->capture_default_str();
  train->add_option("--kernel-timeline", opt->kernel_timeline,
                    "Also record one more step with CUPTI and write when each kernel, memset, "
                    "memcpy and CUDA runtime call ran, one JSON line each tagged seq, part "
                    "(train_step) and rank, to FILE (under mpirun each rank to FILE.rank<N>; "
                    "scripts/timeline_summary.py sums it up)");
  train->callback([opt] {
#if MOEFORGE_HAVE_CUDA
    run_bench_train(*opt);
#else
    MF_FAIL(
        "moeforge was built without CUDA; `bench train` needs a GPU build (-DMOEFORGE_CUDA=ON)");
#endif
  });

  // gemm_lab.h declares plain options (no CUDA types), so CPU builds parse them too.
  auto gemm_opt = std::make_shared<cuda::GemmLabOptions>();
  CLI::App* gemm = bench->add_subcommand(
      "gemm",
      "Kernel lab of the expert GEMMs: one MoE projection over a random routing (forward, input "
      "gradient, weight gradient assigned and accumulated) by every candidate of this build "
      "(per-expert cuBLASLt calls, each CUTLASS grouped GEMM configuration on Hopper, cuBLAS "
      "grouped batched GEMM) against one dense cuBLASLt GEMM of the same FLOPs; prints one JSON "
      "line with ms, TFLOP/s and the ratio to dense. MOEFORGE_GROUPED_GEMM picks the "
      "configurations training runs (README)");
  gemm->add_option("--tokens", gemm_opt->tokens, "Tokens routed")->capture_default_str();
  gemm->add_option("--hidden", gemm_opt->hidden, "Hidden size (the projection's input)")
      ->capture_default_str();
  gemm->add_option("--expert-ffn", gemm_opt->expert_ffn,
                   "Expert ffn size (the projection's output)")
      ->capture_default_str();
  gemm->add_option("--experts", gemm_opt->num_experts, "Experts")->capture_default_str();
  gemm->add_option("--top-k", gemm_opt->top_k, "Experts per token")->capture_default_str();
  gemm->add_option("--repeats", gemm_opt->repeats, "Timed repeats (median)")->capture_default_str();
  gemm->callback([gemm_opt] {
#if MOEFORGE_HAVE_CUDA
    fmt::print("{}\n", cuda::run_gemm_lab(*gemm_opt).dump());
#else
    MF_FAIL("moeforge was built without CUDA; `bench gemm` needs a GPU build (-DMOEFORGE_CUDA=ON)");
#endif
  });

  // prefill_bench.h declares plain options too.
  auto prefill_opt = std::make_shared<cuda::PrefillBenchOptions>();
  CLI::App* prefill = bench->add_subcommand(
      "prefill",
      "Causal prefill attention of one sequence per length: dense (cuDNN SDPA and our "
      "block-sparse kernel over every causal block) against FlexPrefill (GPU pattern search, "
      "exact and fast both timed, with their agreement; then our block-sparse kernel), with the "
      "selection's density; prints one JSON line per length as it finishes (JSONL)");
  prefill->add_option("--seq", prefill_opt->seqs, "Sequence lengths")
      ->delimiter(',')
      ->capture_default_str();
  prefill->add_option("--heads", prefill_opt->num_heads, "Query heads")->capture_default_str();
  prefill->add_option("--kv-heads", prefill_opt->num_kv_heads, "KV heads")->capture_default_str();
  prefill->add_option("--head-dim", prefill_opt->head_dim, "Head dimension")->capture_default_str();
  prefill
      ->add_option("--qkv", prefill_opt->qkv_file,
                   "Q/K/V of a real layer from `moeforge generate --dump-qkv` (its shapes "
                   "replace --heads, --kv-heads, --head-dim; lengths are prefixes of it)")
      ->check(CLI::ExistingFile);
  prefill
      ->add_option(
          "--layout", prefill_opt->layout_file,
          "Also time our kernel on given block sets: a safetensors file with an I64 tensor "
          "block_idx_<seq> [heads, k] of flat block indices r * num_blocks + c per length "
          "(metadata block_size = --block-size), as scripts/reference_prefill_bench.py "
          "writes for the public FlexPrefill kernel")
      ->check(CLI::ExistingFile);
  prefill->add_option("--gamma", prefill_opt->params.gamma, "FlexPrefill coverage, in (0, 1]")
      ->capture_default_str();
  prefill->add_option("--tau", prefill_opt->params.tau, "Query-aware JS threshold")
      ->capture_default_str();
  prefill->add_option("--min-budget", prefill_opt->params.min_budget, "Minimum tokens per head")
      ->capture_default_str();
  prefill
      ->add_option("--max-budget", prefill_opt->params.max_budget,
                   "Maximum tokens per head (0: none)")
      ->capture_default_str();
  prefill->add_option("--block-size", prefill_opt->params.block_size, "64 or 128")
      ->capture_default_str();
  auto flex_search = std::make_shared<std::string>("fast");
  prefill
      ->add_option("--flex-search", *flex_search,
                   "Pattern search whose selection the sparse attention runs on: fast or exact "
                   "(both are timed: flex_select_fast_ms, flex_select_ms)")
      ->capture_default_str();
  prefill
      ->add_option("--select-path", prefill_opt->select_path,
                   "How the fast search's coverage selects run: auto (clusters where a segment "
                   "takes at most 4 blocks, else many-blocks), many-blocks (a launch per radix "
                   "pass) or clusters (a thread block cluster per segment in one launch, on Hopper "
                   "where a segment fits; many-blocks elsewhere)")
      ->check(CLI::IsMember({"auto", "many-blocks", "clusters"}))
      ->capture_default_str();
  prefill->add_option("--repeats", prefill_opt->repeats, "Timed repeats (median)")
      ->capture_default_str();
  prefill->add_option("--kernel-timeline", prefill_opt->timeline_file,
                      "Also record one untimed run of every timed part with CUPTI and write "
                      "when each kernel, memset, memcpy and CUDA runtime call ran, one JSON line "
                      "each tagged seq and part, to FILE (scripts/timeline_summary.py sums it up)");
  prefill->callback([prefill_opt, flex_search] {
    prefill_opt->params.search = parse_flex_search(*flex_search);
#if MOEFORGE_HAVE_CUDA
    cuda::run_prefill_bench(*prefill_opt, [](const nlohmann::json& line) {
      fmt::print("{}\n", line.dump());
      std::fflush(stdout);
    });
#else
    MF_FAIL(
        "moeforge was built without CUDA; `bench prefill` needs a GPU build (-DMOEFORGE_CUDA=ON)");
#endif
  });
}

}  // namespace moeforge::cli
