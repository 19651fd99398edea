// `moeforge bench comm`: the communication volume of one training step's forward and backward under
// a parallel layout, measured on the CPU engine over the ranks of mpirun (one sequence/expert- or
// tensor-parallel group) and set beside the per-layer formulas of docs/design.md: the volume half
// of MegaScale-MoE's ablation (tp against sp_ep, each MoE dispatch), on any model config.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "comm/counting_communicator.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/model_config.h"
#include "model/moe_ffn.h"
#include "model/tensor_parallel.h"
#include "model/transformer.h"

namespace moeforge::cli {
namespace {

struct BenchCommOptions {
  std::string config;
  std::string layout = "sp_ep";
  std::string dispatch = "auto";
  int64_t micro_batch = 1;
  int64_t seq = 256;
  uint64_t seed = 1;
};

using Collective = CountingCommunicator::Collective;
constexpr std::array<Collective, 6> kCollectives = {
    Collective::kAllGather, Collective::kReduceScatter, Collective::kAllToAll,
    Collective::kAllReduce, Collective::kBroadcast,     Collective::kReduce};
constexpr std::array<const char*, 6> kCollectiveNames = {
    "all_gather", "reduce_scatter", "all_to_all", "all_reduce", "broadcast", "reduce"};

// Elements one rank sends per collective in one forward + backward, by the formulas of
// docs/design.md (CountingCommunicator's way of counting), for n ranks of n_tokens local tokens
// each; the all-to-all dispatch's with balanced routing and no dropped tokens.
std::array<double, 6> formula_elements(const ModelConfig& c, ParallelLayout layout,
                                       const EpDispatchPlan& plan, int64_t n, int64_t n_tokens) {
  const double m = static_cast<double>(n - 1), N = static_cast<double>(n_tokens);
  const double h = static_cast<double>(c.hidden_size),
               k = static_cast<double>(c.num_experts_per_tok);
  const double q = static_cast<double>(c.q_dim()), kv = static_cast<double>(c.kv_dim());
  const double rows = m * N * h;  // (n - 1) N h: one all-gather or reduce-scatter of the tokens
  std::array<double, 6> e{};      // in kCollectives' order
  e[3] = 2.0 * m;                 // the loss's all-reduce of two doubles
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const bool moe = c.layer_is_moe(l);
    if (layout == ParallelLayout::kTensor) {
      // Attention and the FFN each: all-gather in, reduce-scatter out, mirrored in the backward.
      e[0] += 4.0 * rows;
      e[1] += 4.0 * rows;
      if (moe) e[3] += m * n * N * k;  // the gate gradients of every group token
      if (moe && c.shared_expert_intermediate_size > 0) e[3] += m * n * N;  // shared gate scores
      continue;
    }
    e[2] += 4.0 * m * N * (q + kv) / static_cast<double>(n);  // Ulysses: q, k, v and out, x2
    if (!moe) continue;
    if (choose_ep_dispatch(plan.layer(l), c.num_experts_per_tok, n) == EpDispatch::kAllGather) {
      e[0] += 2.0 * rows;
      e[1] += 2.0 * rows;
      e[3] += m * n * N * k;
    } else {
      // Each kept row to its expert's rank and back, forward and backward; the plan's all-gather
      // of every rank's per-expert counts and all-reduce of the router's sums.
      e[2] += 4.0 * N * k * h * m / static_cast<double>(n);
      e[0] += m * static_cast<double>(c.num_experts);
      e[3] += m * static_cast<double>(c.num_experts + 1);
    }
  }
  return e;
}

void run_bench_comm(const BenchCommOptions& opt) {
  const ModelConfig config = load_model_config(opt.config);
  Communicator& world = world_communicator();
  const int64_t n = world.size();
  const ParallelLayout layout = parse_parallel_layout(opt.layout);
  const EpDispatchPlan plan = parse_ep_dispatch_plan(opt.dispatch, config.num_layers);
  MF_CHECK(opt.micro_batch > 0 && opt.seq > 0, "--micro-batch and --seq must be positive");
  MF_CHECK(opt.seq % n == 0, "--seq ({}) must be divisible by the number of ranks ({})", opt.seq,
           n);
  const int64_t local_seq = opt.seq / n;
  CountingCommunicator counting(world);
  Transformer<float> model(config, counting, plan, layout);
  model.init_random(opt.seed, 0.02);
  Rng rng(opt.seed + 1 + static_cast<uint64_t>(world.rank()));
  std::vector<int32_t> tokens(static_cast<size_t>(opt.micro_batch * local_seq));
  std::vector<int32_t> targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    targets[i] = static_cast<int32_t>(rng.below(config.vocab_size));
  }
  model.zero_grads();
  model.forward(tokens.data(), targets.data(), opt.micro_batch, local_seq);
  model.backward(1.0);

  // Per collective: the mean and the largest over the ranks (the all-to-all dispatch's volume
  // follows the routing), through the world itself so that it is not counted.
  std::vector<double> mine(kCollectives.size()), sums(kCollectives.size() * n);
  for (size_t i = 0; i < kCollectives.size(); ++i) {
    mine[i] = static_cast<double>(counting.elements(kCollectives[i]));
  }
  world.all_gather(mine.data(), sums.data(), mine.size());
  if (world.rank() != 0) return;
  const int64_t n_tokens = opt.micro_batch * local_seq;
  const std::array<double, 6> formula = formula_elements(config, layout, plan, n, n_tokens);
  nlohmann::json measured_mean, measured_max, expected;
  double mean_total = 0.0, formula_total = 0.0;
  for (size_t i = 0; i < kCollectives.size(); ++i) {
    double total = 0.0, largest = 0.0;
    for (int64_t r = 0; r < n; ++r) {
      const double v = sums[static_cast<size_t>(r) * kCollectives.size() + i];
      total += v;
      largest = std::max(largest, v);
    }
    measured_mean[kCollectiveNames[i]] = total / static_cast<double>(n);
    measured_max[kCollectiveNames[i]] = largest;
    expected[kCollectiveNames[i]] = formula[i];
    mean_total += total / static_cast<double>(n);
    formula_total += formula[i];
  }
  const nlohmann::json line = {
      {"ranks", n},
      {"layout", parallel_layout_name(layout)},
      {"ep_dispatch", opt.dispatch},
      {"tokens_per_rank", n_tokens},
      {"layers", config.num_layers},
      {"elements_per_rank", measured_mean},
      {"elements_per_rank_max", measured_max},
      {"formula_elements_per_rank", expected},
      {"elements_per_rank_per_layer", mean_total / static_cast<double>(config.num_layers)},
      {"formula_elements_per_rank_per_layer",
       formula_total / static_cast<double>(config.num_layers)},
      {"bf16_mib_per_rank_per_layer",
       mean_total * 2.0 / static_cast<double>(config.num_layers) / (1 << 20)},
  };
  fmt::print("{}\n", line.dump());
}

}  // namespace

void add_bench_comm_command(CLI::App& bench) {
  auto opt = std::make_shared<BenchCommOptions>();
  CLI::App* comm = bench.add_subcommand(
      "comm",
      "Communication volume of one forward + backward of a model config under a parallel layout, "
      "on the CPU engine over the ranks of mpirun (one group): elements each rank sends per "
      "collective (mean and largest over the ranks) beside the formulas of docs/design.md "
      "(the all-to-all dispatch's for balanced routing), and per layer; one JSON line");
  comm->add_option("--config", opt->config, "Model config.json")
      ->required()
      ->check(CLI::ExistingFile);
  comm->add_option("--layout", opt->layout,
                   "sp_ep (Ulysses attention, expert parallel MoE) or tp (Megatron-LM tensor "
                   "parallel)")
      ->check(CLI::IsMember({"sp_ep", "tp"}))
      ->capture_default_str();
  comm->add_option("--ep-dispatch", opt->dispatch,
                   "Under sp_ep: allgather, alltoall or auto, or one per decoder layer, "
                   "comma-separated (as parallel.ep_dispatch)")
      ->capture_default_str();
  comm->add_option("--micro-batch", opt->micro_batch, "Sequences")->capture_default_str();
  comm->add_option("--seq", opt->seq, "Tokens per sequence (split over the ranks)")
      ->capture_default_str();
  comm->add_option("--seed", opt->seed, "Seed of the weights and tokens")->capture_default_str();
  comm->callback([opt] { run_bench_comm(*opt); });
}

}  // namespace moeforge::cli
