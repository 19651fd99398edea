// The training loop (see trainer.h).
#include "train/trainer.h"

#include <fmt/format.h>

#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "model/model_io.h"
#include "model/transformer.h"
#include "train/adamw.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/expert_shards.h"
#include "train/lr_schedule.h"
#include "train/pma_job.h"
#include "train/zero_optimizer.h"

namespace moeforge {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

ModelConfig resolve_model_config(const TrainConfig& config) {
  if (!config.model.init_from.empty())
    return load_model_config(config.model.init_from / "config.json");
  return load_model_config(config.model.model_config);
}

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds);
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s / 60) % 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

// MFU is reported against the dense bf16 peak of an H100/H200 (989 TFLOP/s), as in
// ../shared/docs/anchors.md, whatever the device, so numbers compare across runs.
constexpr double kPeakFlops = 989e12;

// Training FLOPs per token: 6 * active parameters + 6 * layers * seq * q_dim (causal attention),
// the formula of ../shared/docs/anchors.md.
double flops_per_token(const ModelConfig& c, const ParameterLayout& layout, int64_t seq) {
  return 6.0 * static_cast<double>(layout.num_active_params()) +
         6.0 * static_cast<double>(c.num_layers * seq * c.q_dim());
}

class MetricsLog {
 public:
  MetricsLog(const fs::path& path, bool enabled) {
    if (!enabled) return;
    if (path.has_parent_path()) fs::create_directories(path.parent_path());
    out_.open(path, std::ios::app);
    MF_CHECK(out_.good(), "cannot open the metrics file {} for appending", path.string());
  }
  // Thread-safe: the PMA job writes its records from its own thread.
  void write(const nlohmann::json& record) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!out_.is_open()) return;
    out_ << record.dump() << '\n';
    out_.flush();
  }

 private:
  std::mutex mutex_;
  std::ofstream out_;
};

// One sequence slice per rank of an expert/sequence-parallel group: rank r of n keeps positions
// [r * seq / n, (r + 1) * seq / n) of each of the batch's sequences.
void slice_sequences(const int32_t* full, int32_t* local, int64_t batch, int64_t seq, int64_t rank,
                     int64_t num_ranks) {
  const int64_t local_seq = seq / num_ranks;
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(full + b * seq + rank * local_seq, full + b * seq + (rank + 1) * local_seq,
              local + b * local_seq);
  }
}

}  // namespace

TrainSummary train(const TrainConfig& config, const TrainRunOptions& options, Communicator& world) {
  const bool is_root = world.rank() == 0;
  // Groups of n consecutive ranks share sequences and split experts (or, under parallel.layout
  // "tp", attention heads and FFN columns); ranks with the same position in their group form the
  // data-parallel groups.
  const int64_t n = config.parallel.expert_parallel;
  const bool zero1 = config.parallel.zero_stage == 1;
  MF_CHECK(world.size() % n == 0,
           "parallel.expert_parallel ({}) must divide the number of ranks ({})", n, world.size());
  MF_CHECK(config.parallel.ep_comm_dtype == "fp32" || options.device != "cpu",
           "parallel.ep_comm_dtype \"bf16\" compresses the GPU engine's expert-parallel "
           "exchanges; the CPU engine exchanges in full precision (set it to \"fp32\")");
  // What the GPU engine's tensor parallelism (the Megatron-LM baseline) does not run.
  if (config.parallel.layout == "tp" && options.device != "cpu") {
    MF_CHECK(!zero1,
             "parallel.zero_stage 1 with parallel.layout \"tp\" runs on the CPU engine only; with "
             "--device {} set parallel.zero_stage 0 (or parallel.layout \"sp_ep\")",
             options.device);
    MF_CHECK(config.parallel.ep_comm_dtype == "fp32",
             "parallel.ep_comm_dtype \"{}\" compresses the expert-parallel exchanges of "
             "parallel.layout \"sp_ep\"; layout \"tp\" exchanges activations in bf16 and "
             "fp32 as Megatron-LM does (set it to \"fp32\")",
             config.parallel.ep_comm_dtype);
    MF_CHECK(config.parallel.ep_overlap_chunks == 1,
             "parallel.ep_overlap_chunks {} overlaps the expert-parallel exchanges of "
             "parallel.layout \"sp_ep\"; layout \"tp\" runs without overlap, the baseline of "
             "MegaScale-MoE's ablation (set it to 1)",
             config.parallel.ep_overlap_chunks);
  }
  SelfCommunicator self;
  std::unique_ptr<Communicator> ep_group, dp_group;
  if (n > 1) {
    ep_group = world.split(static_cast<int>(world.rank() / n), world.rank());
    dp_group = world.split(static_cast<int>(world.rank() % n), world.rank());
  }
  Communicator& expert_group = n > 1 ? *ep_group : static_cast<Communicator&>(self);
  Communicator& dp = n > 1 ? *dp_group : world;
  const ModelConfig model_config = resolve_model_config(config);
  const data::TokenDataset train_data = data::TokenDataset::open(config.data.dataset, "train");
  const data::TokenDataset val_data = data::TokenDataset::open(config.data.dataset, "val");
  const auto tokenizer = data::load_tokenizer(config.data.dataset);
  MF_CHECK(train_data.vocab_size() <= model_config.vocab_size,
           "the dataset's vocabulary ({} tokens) does not fit the model's vocab_size ({})",
           train_data.vocab_size(), model_config.vocab_size);

  const data::WindowLayout window_layout =
      data::parse_window_layout(config.data.windows, "data.windows");
  const data::Windows train_windows(train_data, config.data.seq_len, window_layout);
  const data::Windows val_windows(val_data, config.data.seq_len, window_layout);
  MF_CHECK(
      count_scored_targets(val_windows, config.data.micro_batch_size, config.eval.max_batches) > 0,
      "no target in the validation windows that eval scores (eval.max_batches {} x "
      "data.micro_batch_size {} windows of {} tokens) counts in the loss: the dataset's loss "
      "mask excludes them all; raise eval.max_batches or data.seq_len",
      config.eval.max_batches, config.data.micro_batch_size, config.data.seq_len);
  MF_CHECK(model_config.max_position_embeddings <= 0 ||
               config.data.seq_len <= model_config.max_position_embeddings,
           "data.seq_len ({}) exceeds the model's max_position_embeddings ({})",
           config.data.seq_len, model_config.max_position_embeddings);

  const ParallelLayout parallel_layout = parse_parallel_layout(config.parallel.layout);
  Transformer<float> model(
      model_config, expert_group,
      parse_ep_dispatch_plan(config.parallel.ep_dispatch, model_config.num_layers),
      parallel_layout);
  const AdamWHyper adamw_hyper{config.optimizer.beta1, config.optimizer.beta2, config.optimizer.eps,
                               config.optimizer.weight_decay};
  // Without ZeRO every rank holds the whole AdamW state; with ZeRO-1 only its shard of it.
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<ZeroAdamW> zero_optimizer;
  // With sharded experts (sp_ep over several ranks) every rank holds its own experts only: their
  // gradients are the group's already and are summed over the data-parallel group alone.
  const ParameterLayout& layout = model.layout();
  const bool sharded = layout.experts_sharded();
  if (zero1) {
    zero_optimizer = std::make_unique<ZeroAdamW>(layout, adamw_hyper, config.optimizer.no_decay, dp,
                                                 sharded ? &expert_group : nullptr);
  } else {
    optimizer = std::make_unique<AdamW>(layout, adamw_hyper, config.optimizer.no_decay);
  }
  data::BatchSampler sampler(train_windows, config.data.seed);
  TrainerState state;
  state.init_seed = config.model.seed;
  state.data_seed = config.data.seed;

  if (is_root) {
    const fs::path resume_target = options.resume.value_or(fs::path());
    for (const fs::path& leftover :
         remove_checkpoint_leftovers(config.checkpoint.dir, resume_target)) {
      fmt::print(stderr, "removed {}, left by an interrupted checkpoint save\n", leftover.string());
    }
  }
  if (options.resume) {
    const fs::path ckpt = resolve_checkpoint(*options.resume);
    if (zero1) {
      // Each rank reads its shard of the moments from the checkpoint's whole tensors.
      AdamWStateRange shard{zero_optimizer->shard().begin, zero_optimizer->shard().end,
                            zero_optimizer->exp_avg().data(), zero_optimizer->exp_avg_sq().data()};
      state = load_checkpoint(ckpt, model, shard);
      zero_optimizer->set_step_count(shard.step_count);
    } else {
      state = load_checkpoint(ckpt, model, *optimizer);
    }
    sampler.set_state(state.loader.get<data::LoaderState>());
    if (is_root) fmt::print(stderr, "resumed from {} at step {}\n", ckpt.string(), state.step);
  } else if (!config.model.init_from.empty()) {
    read_hf_weights(config.model.init_from, model.layout(), model.params().data());
    if (is_root) {
      fmt::print(stderr, "initialised weights from {} (fresh optimizer state)\n",
                 config.model.init_from.string());
    }
  } else {
    model.init_random(config.model.seed, config.model.init_std);
  }

  std::unique_ptr<StepEngine> engine;
  if (zero1 && options.device == "cpu") {
    engine = make_cpu_zero1_step_engine(model, *zero_optimizer);
  } else if (zero1) {
    MF_CHECK(options.zero1_engine_factory != nullptr,
             "device '{}' is not available in this build (only cpu)", options.device);
    engine = options.zero1_engine_factory(options.device, model, *zero_optimizer);
  } else if (options.device == "cpu") {
    engine = make_cpu_step_engine(model, *optimizer);
  } else {
    MF_CHECK(options.engine_factory != nullptr,
             "device '{}' is not available in this build (only cpu)", options.device);
    engine = options.engine_factory(options.device, model, *optimizer);
  }
  engine->load_from_host();

  const int64_t seq = config.data.seq_len;
  const int64_t micro = config.data.micro_batch_size;
  const int64_t accum = config.data.grad_accum_steps;
  const int64_t tokens_per_step = dp.size() * accum * micro * seq;
  const int64_t local_seq = seq / n;
  const GradReduceDtype grad_reduce_dtype =
      parse_grad_reduce_dtype(config.parallel.grad_reduce_dtype);
  const auto grad_bucket_bytes =
      static_cast<size_t>(config.parallel.grad_bucket_mb * 1024.0 * 1024.0);
  // The engine's forward on this rank's slice of the sequences (evaluation windows included).
  const ForwardFn local_forward = [&, forward = engine->forward_fn()](
                                      const int32_t* tokens, const int32_t* targets, int64_t batch,
                                      int64_t full_seq) {
    if (n == 1) return forward(tokens, targets, batch, full_seq);
    std::vector<int32_t> t(static_cast<size_t>(batch * full_seq / n)), y(t.size());
    slice_sequences(tokens, t.data(), batch, full_seq, expert_group.rank(), n);
    slice_sequences(targets, y.data(), batch, full_seq, expert_group.rank(), n);
    return forward(t.data(), y.data(), batch, full_seq / n);
  };
  const double flops_tok = flops_per_token(model_config, model.layout(), seq);
  const fs::path run_dir = config.checkpoint.dir;
  const nlohmann::json config_json = train_config_to_json(config);
  MetricsLog metrics(config.log.metrics_file, is_root);
  const bool pma = config.pma.enabled;
  MF_CHECK(
      !pma || config.pma.interval_tokens % tokens_per_step == 0,
      "pma.interval_tokens ({}) must be a multiple of the tokens of one step over all ranks ({})",
      config.pma.interval_tokens, tokens_per_step);
  auto is_pma_checkpoint = [&](int64_t tokens) {
    return pma && tokens % config.pma.interval_tokens == 0;
  };
  std::unique_ptr<PmaJob> pma_job;
  if (pma && is_root) {
    pma_job = std::make_unique<PmaJob>(config, model_config, val_windows, *tokenizer,
                                       [&metrics](const nlohmann::json& r) { metrics.write(r); });
  }
  if (is_root) {
    fmt::print(stderr,
               "training {} with {} parameters ({} active) on {} rank(s) ({}; {} data-parallel x "
               "{} {}): {} tokens/step, {} steps\n",
               architecture_name(model_config.architecture), layout.num_model_params(),
               layout.num_active_params(), world.size(), options.device, dp.size(), n,
               parallel_layout == ParallelLayout::kTensor
                   ? "tensor-parallel (parallel.layout \"tp\")"
                   : "expert/sequence-parallel",
               tokens_per_step, config.schedule.max_steps);
    if (n > 1 && model_config.is_moe() && parallel_layout == ParallelLayout::kSequenceExpert) {
      // The variant each MoE layer runs.
      std::vector<std::optional<EpDispatch>> runs(static_cast<size_t>(model_config.num_layers));
      for (int64_t l = 0; l < model_config.num_layers; ++l) {
        if (model_config.layer_is_moe(l)) {
          runs[static_cast<size_t>(l)] =
              choose_ep_dispatch(model.ep_dispatch().layer(l), model_config.num_experts_per_tok, n);
        }
      }
      fmt::print(stderr,
                 "expert dispatch: {} (parallel.ep_dispatch \"{}\", top-{} over {} ranks)\n",
                 describe_ep_dispatch(runs), config.parallel.ep_dispatch,
                 model_config.num_experts_per_tok, n);
    }
  }

  // A step's micro-batches, read before the first backward (their counted targets set the
  // cross-entropy's average).
  std::vector<int32_t> inputs(accum * micro * seq), targets(accum * micro * seq);
  std::vector<int32_t> local_inputs(micro * local_seq), local_targets(micro * local_seq);
  TrainSummary summary;
  const auto run_start = Clock::now();
  const int64_t first_step = state.step;
  const bool tty = isatty(fileno(stderr));

  auto run_eval = [&](int64_t step) -> double {
    const EvalResult ev =
        evaluate(local_forward, val_windows, *tokenizer, micro, config.eval.max_batches, dp);
    summary.final_val_loss = ev.loss;
    metrics.write({{"step", step},
                   {"val_loss", ev.loss},
                   {"val_ppl", ev.perplexity},
                   {"val_bpb", ev.bits_per_byte},
                   {"val_tokens", ev.num_tokens}});
    if (is_root) {
      fmt::print(stderr, "{}step {}: val loss {:.4f}  ppl {:.2f}  bpb {:.4f}\n", tty ? "\n" : "",
                 step, ev.loss, ev.perplexity, ev.bits_per_byte);
    }
    return ev.loss;
  };
  auto save = [&] {
    engine->store_to_host();
    state.loader = sampler.state();
    // With ZeRO-1 the data-parallel groups gather the moments to their rank 0 (the group of world
    // rank 0 only, unless each group holds other experts); with sharded experts those ranks, world
    // rank 0's expert group, then gather every shard to world rank 0. So the checkpoint holds the
    // whole model's tensors whatever the layout.
    std::vector<float> gathered_avg, gathered_avg_sq;
    if (zero1 && (sharded || expert_group.rank() == 0)) {
      zero_optimizer->gather_state(gathered_avg, gathered_avg_sq);
    }
    float* params = model.params().data();
    float* exp_avg = zero1 ? gathered_avg.data() : optimizer->exp_avg().data();
    float* exp_avg_sq = zero1 ? gathered_avg_sq.data() : optimizer->exp_avg_sq().data();
    std::vector<float> whole_params, whole_avg, whole_avg_sq;
    if (sharded && dp.rank() == 0) {
      whole_params = gather_expert_shards(layout, params, expert_group);
      whole_avg = gather_expert_shards(layout, exp_avg, expert_group);
      whole_avg_sq = gather_expert_shards(layout, exp_avg_sq, expert_group);
      params = whole_params.data();
      exp_avg = whole_avg.data();
      exp_avg_sq = whole_avg_sq.data();
    }
    if (is_root) {
      const ParameterLayout whole(model_config);
      const AdamWStateRange optimizer_state{
          0, whole.num_params(), exp_avg, exp_avg_sq,
          zero1 ? zero_optimizer->step_count() : optimizer->step_count()};
      summary.last_checkpoint = save_checkpoint(
          run_dir, whole, params, optimizer_state, state, config_json, config.data.dataset,
          config.checkpoint.keep_last, [&](const io::CheckpointEntry& e) {
            return is_pma_checkpoint(e.tokens_seen) &&
                   e.tokens_seen >
                       state.tokens_seen - config.pma.count * config.pma.interval_tokens;
          });
    }
    world.barrier();
  };

  while (state.step < config.schedule.max_steps) {
    const auto step_start = Clock::now();
    const double lr = learning_rate(config.schedule, config.optimizer.lr, state.step);
    engine->zero_grads();
    // Sums over this rank's micro-batches: the router terms of the loss (loss - ce), the
    // cross-entropy over the counted targets (ce mean x count), aux, z.
    double loss_sums[4] = {0, 0, 0, 0};
    std::vector<int64_t> expert_load;
    int64_t dropped = 0;
    const int64_t window_tokens = micro * seq;
    double step_counted = 0;
    for (int64_t m = 0; m < accum; ++m) {
      sampler.next_batch_for_rank(micro, dp.rank(), dp.size(), inputs.data() + m * window_tokens,
                                  targets.data() + m * window_tokens);
    }
    for (const int32_t t : targets) step_counted += t >= 0;
    dp.all_reduce_sum(&step_counted, 1);
    // The cross-entropy is the mean over every counted target of the step, as one batch of
    // accum x dp micro-batches would give (with loss masks the micro-batches count different
    // numbers of targets): each micro-batch's gradient divides by the step's average count per
    // micro-batch instead of its own. The router losses stay a mean over the micro-batches.
    const double ce_count = step_counted / static_cast<double>(accum * dp.size());
    for (int64_t m = 0; m < accum; ++m) {
      slice_sequences(inputs.data() + m * window_tokens, local_inputs.data(), micro, seq,
                      expert_group.rank(), n);
      slice_sequences(targets.data() + m * window_tokens, local_targets.data(), micro, seq,
                      expert_group.rank(), n);
      std::vector<MoeFfnStats> moe_stats;
      // The sums of the last micro-batch may start during its backward: the world's all-reduce,
      // or ZeRO-1's sums onto the shard owners when no expert-group sum has to come first.
      Communicator* const announced = !zero1 ? &world : n == 1 ? &dp : nullptr;
      if (m + 1 == accum && announced != nullptr && announced->size() > 1) {
        engine->begin_grad_reduce(*announced, grad_reduce_dtype, grad_bucket_bytes);
      }
      const LossBreakdown loss = engine->forward_backward(
          local_inputs.data(), local_targets.data(), micro, local_seq,
          1.0 / static_cast<double>(accum * dp.size()), ce_count, moe_stats);
      loss_sums[0] += loss.loss - loss.ce_loss;
      loss_sums[1] += loss.ce_loss * static_cast<double>(loss.num_counted);
      loss_sums[2] += loss.aux_loss;
      loss_sums[3] += loss.z_loss;
      for (const MoeFfnStats& s : moe_stats) {
        if (expert_load.empty()) expert_load.assign(s.expert_load.size(), 0);
        for (size_t e = 0; e < s.expert_load.size(); ++e) expert_load[e] += s.expert_load[e];
        dropped += s.num_dropped;
      }
    }
    // Over the whole world: the expert/sequence group's partial gradients (each rank's tokens, or
    // under "tp" each rank's weight slices) and the data-parallel replicas in one sum; with
    // sharded experts the expert ranges over the data-parallel group only. ZeRO-1 shards over the
    // data-parallel group only: the group's partial gradients are summed first (in fp32), then
    // reduce-scattered over dp, which groups the sum differently from the world's all-reduce
    // (equal to it to fp32 rounding; bit-identical when expert_parallel is 1).
    if (zero1) {
      if (n > 1) engine->sum_expert_group_grads(expert_group);
      engine->all_reduce_grads(dp, grad_reduce_dtype);
    } else if (sharded) {
      engine->all_reduce_grad_ranges(world, grad_reduce_dtype, layout.replicated_ranges());
      engine->all_reduce_grad_ranges(dp, grad_reduce_dtype, layout.expert_ranges());
    } else {
      engine->all_reduce_grads(world, grad_reduce_dtype);
    }
    // Every rank of a group reports the group's loss: sum over data-parallel replicas only.
    dp.all_reduce_sum(loss_sums, 4);
    // Checked after the reductions, so that every rank takes the same decision (a NaN anywhere
    // makes the sums NaN).
    const double denom = static_cast<double>(accum * dp.size());
    const double step_ce = step_counted > 0 ? loss_sums[1] / step_counted : 0.0;
    const double step_loss = step_ce + loss_sums[0] / denom;
    const StepUpdate update =
        engine->update(lr, config.optimizer.grad_clip, std::isfinite(step_loss));
    const double grad_norm = update.grad_norm;
    const bool finite = update.applied;
    if (!finite) {
      const std::string report = fmt::format(
          "step {}: non-finite loss ({}) or gradient norm ({}); first tensor with a non-finite "
          "gradient in backward order: {}",
          state.step + 1, step_loss, grad_norm, engine->first_nonfinite_gradient());
      MF_CHECK(config.optimizer.on_nonfinite == "skip",
               "{}; stopping (optimizer.on_nonfinite=stop)", report);
      if (is_root) fmt::print(stderr, "{}{}; update skipped\n", tty ? "\n" : "", report);
      metrics.write({{"step", state.step + 1}, {"event", "nonfinite_skipped"}, {"report", report}});
    }
    ++state.step;
    state.tokens_seen += tokens_per_step;
    state.lr = lr;

    summary.final_loss = step_loss;
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    const double tokens_per_s = static_cast<double>(tokens_per_step) / step_seconds;
    if (finite &&
        (state.step % config.log.every_steps == 0 || state.step == config.schedule.max_steps)) {
      nlohmann::json record = {{"step", state.step},
                               {"loss", summary.final_loss},
                               {"ce_loss", step_ce},
                               {"counted_targets", static_cast<int64_t>(step_counted)},
                               {"aux_loss", loss_sums[2] / denom},
                               {"z_loss", loss_sums[3] / denom},
                               {"grad_norm", grad_norm},
                               {"lr", lr},
                               {"tokens", state.tokens_seen},
                               {"tokens_per_s", tokens_per_s},
                               {"model_tflops", tokens_per_s * flops_tok / 1e12},
                               {"mfu", tokens_per_s * flops_tok / kPeakFlops}};
      if (!expert_load.empty()) {
        record["expert_load_min"] = *std::min_element(expert_load.begin(), expert_load.end());
        record["expert_load_max"] = *std::max_element(expert_load.begin(), expert_load.end());
        record["tokens_dropped"] = dropped;
      }
      metrics.write(record);
      if (is_root && options.progress) {
        const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
        const double per_step = elapsed / static_cast<double>(state.step - first_step);
        const double eta = per_step * static_cast<double>(config.schedule.max_steps - state.step);
        fmt::print(
            stderr,
            "{}step {}/{} | loss {:.4f} | lr {:.2e} | gnorm {:.3f} | {:.0f} tok/s | ETA {}{}",
            tty ? "\r" : "", state.step, config.schedule.max_steps, summary.final_loss, lr,
            grad_norm, tokens_per_s, format_duration(eta), tty ? "   " : "\n");
        std::fflush(stderr);
      }
    }
    const bool last = state.step == config.schedule.max_steps;
    const bool pma_merge = pma && state.step % config.pma.every_steps == 0;
    double val_loss = std::numeric_limits<double>::quiet_NaN();
    if ((config.eval.every_steps > 0 && state.step % config.eval.every_steps == 0) || last ||
        pma_merge) {
      val_loss = run_eval(state.step);
    }
    if ((config.checkpoint.every_steps > 0 && state.step % config.checkpoint.every_steps == 0) ||
        last || is_pma_checkpoint(state.tokens_seen)) {
      save();
    }
    if (pma_merge && pma_job) pma_job->maybe_start(state.step, state.tokens_seen, val_loss);
  }
  if (pma_job) pma_job->wait();
  if (is_root && tty && options.progress) fmt::print(stderr, "\n");
  summary.steps = state.step;
  return summary;
}

}  // namespace moeforge
