// The training loop end to end on a tiny MoE: loss goes down, resume continues bit for bit,
// checkpoints and their index, gradient accumulation.
#include "train/trainer.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "model/model_io.h"
#include "model/thread_communicator.h"
#include "train/checkpoint.h"
#include "train/train_fixture.h"

namespace moeforge {
namespace {

// Options of a quiet run on the CPU.
TrainRunOptions no_progress() {
  TrainRunOptions options;
  options.progress = false;
  return options;
}

using testing::TrainFixture;

std::vector<nlohmann::json> read_metrics(const std::filesystem::path& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

std::vector<float> read_weights(const std::filesystem::path& dir) {
  const ModelConfig c = load_model_config(dir / "config.json");
  const ParameterLayout layout(c);
  std::vector<float> w(static_cast<size_t>(layout.num_params()));
  read_hf_weights(dir, layout, w.data());
  return w;
}

TEST_F(TrainFixture, LossDecreasesAndCheckpointsAreIndexed) {
  SelfCommunicator self;
  const TrainSummary s = train(config(9), no_progress(), self);
  EXPECT_EQ(s.steps, 9);
  const auto metrics = read_metrics(root_ / "run" / "metrics.jsonl");
  ASSERT_FALSE(metrics.empty());
  const double first = metrics.front().at("loss").get<double>();
  EXPECT_LT(s.final_loss, first - 0.5) << "first " << first;
  EXPECT_TRUE(metrics.front().contains("expert_load_max"));
  EXPECT_TRUE(metrics.front().contains("mfu"));
  const auto entries = io::read_checkpoint_index(root_ / "run");
  ASSERT_EQ(entries.size(), 3u);  // steps 3, 6, 9
  EXPECT_EQ(entries[0].step, 3);
  EXPECT_EQ(entries[2].step, 9);
  EXPECT_EQ(entries[2].tokens_seen, 9 * 4 * 16);
  EXPECT_EQ(resolve_checkpoint(root_ / "run"), entries[2].path);
  EXPECT_TRUE(std::filesystem::exists(entries[2].path / "moeforge_tokenizer.json"));
}

TEST_F(TrainFixture, ResumeContinuesBitForBit) {
  SelfCommunicator self;
  train(config(9), no_progress(), self);
  const auto full = read_metrics(root_ / "run" / "metrics.jsonl");
  const std::vector<float> full_weights =
      read_weights(root_ / "run" / "checkpoints" / "step-00000009");

  // Resume the same run from step 3 into a fresh run directory.
  std::filesystem::rename(root_ / "run", root_ / "first");
  TrainConfig c = config(9);
  TrainRunOptions resume = no_progress();
  resume.resume = root_ / "first" / "checkpoints" / "step-00000003";
  train(c, resume, self);
  const auto resumed = read_metrics(root_ / "run" / "metrics.jsonl");
  const std::vector<float> resumed_weights =
      read_weights(root_ / "run" / "checkpoints" / "step-00000009");
  ASSERT_EQ(full_weights.size(), resumed_weights.size());
  EXPECT_EQ(0, std::memcmp(full_weights.data(), resumed_weights.data(),
                           full_weights.size() * sizeof(float)));
  std::vector<double> full_losses, resumed_losses;
  for (const auto& m : full) {
    if (m.contains("loss") && m.at("step").get<int64_t>() > 3) full_losses.push_back(m.at("loss"));
  }
  for (const auto& m : resumed) {
    if (m.contains("loss")) resumed_losses.push_back(m.at("loss"));
  }
  EXPECT_EQ(full_losses, resumed_losses);
}

TEST_F(TrainFixture, RetentionKeepsTheLastK) {
  SelfCommunicator self;
  TrainConfig c = config(9);
  c.checkpoint.keep_last = 2;
  train(c, no_progress(), self);
  const auto entries = io::read_checkpoint_index(root_ / "run");
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].step, 6);
  EXPECT_FALSE(std::filesystem::exists(root_ / "run" / "checkpoints" / "step-00000003"));
}

TEST_F(TrainFixture, InitFromLoadsWeightsWithFreshOptimizer) {
  SelfCommunicator self;
  train(config(3), no_progress(), self);
  const std::filesystem::path ckpt = root_ / "run" / "checkpoints" / "step-00000003";
  std::filesystem::rename(root_ / "run", root_ / "first");
  TrainConfig c = config(3);
  c.model.model_config.clear();
  c.model.init_from = root_ / "first" / "checkpoints" / "step-00000003";
  const auto metrics_before = read_metrics(root_ / "first" / "metrics.jsonl");
  train(c, no_progress(), self);
  const auto metrics = read_metrics(root_ / "run" / "metrics.jsonl");
  // The first step of the new run starts from the trained weights: its loss is below the
  // first loss of the run that produced them.
  EXPECT_LT(metrics.front().at("loss").get<double>(),
            metrics_before.front().at("loss").get<double>());
  EXPECT_TRUE(std::filesystem::exists(ckpt / "optimizer.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(root_ / "run" / "checkpoints" / "step-00000006"));
}

TEST_F(TrainFixture, GradientAccumulationMatchesOneLargerMicroBatch) {
  // 2 accumulated micro-batches of 4 sequences see the same windows as one micro-batch of 8. The
  // cross-entropy of the first step is the same mean; later steps differ only by rounding and by
  // the aux loss, which is computed per micro-batch.
  SelfCommunicator self;
  train(config(2, 2), no_progress(), self);
  const auto accumulated = read_metrics(root_ / "run" / "metrics.jsonl");
  std::filesystem::remove_all(root_ / "run");
  TrainConfig c = config(2, 1);
  c.data.micro_batch_size = 8;
  train(c, no_progress(), self);
  const auto single = read_metrics(root_ / "run" / "metrics.jsonl");
  EXPECT_NEAR(accumulated[0].at("ce_loss").get<double>(), single[0].at("ce_loss").get<double>(),
              1e-6);
  EXPECT_NEAR(accumulated[1].at("ce_loss").get<double>(), single[1].at("ce_loss").get<double>(),
              1e-3);
  EXPECT_EQ(accumulated[1].at("tokens").get<int64_t>(), single[1].at("tokens").get<int64_t>());
}

TEST_F(TrainFixture, TensorParallelLayoutOnOneRankIsTheSingleRankRun) {
  // Groups of one rank split nothing: both layouts run the same code (bit for bit); the MPI runs
  // of tests/cli compare tp over 2 and 4 ranks with one rank.
  SelfCommunicator self;
  train(config(2), no_progress(), self);
  const auto sp_ep = read_metrics(root_ / "run" / "metrics.jsonl");
  std::filesystem::remove_all(root_ / "run");
  TrainConfig c = config(2);
  c.parallel.layout = "tp";
  train(c, no_progress(), self);
  const auto tp = read_metrics(root_ / "run" / "metrics.jsonl");
  ASSERT_EQ(tp.size(), sp_ep.size());
  for (size_t i = 0; i < tp.size(); ++i) {
    if (tp[i].contains("loss")) {
      EXPECT_EQ(tp[i].at("loss"), sp_ep[i].at("loss")) << i;
    }
  }
}

// A CPU engine that records the calls the trainer makes, so the protocol an overlapping engine
// (the CUDA one's bucketed gradient sums) relies on is checked without a GPU.
class RecordingEngine final : public StepEngine {
 public:
  RecordingEngine(std::unique_ptr<StepEngine> inner, std::vector<std::string>& calls)
      : inner_(std::move(inner)), calls_(calls) {}
  void load_from_host() override { inner_->load_from_host(); }
  void store_to_host() override { inner_->store_to_host(); }
  void zero_grads() override { inner_->zero_grads(); }
  LossBreakdown forward_backward(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                 int64_t seq, double dloss, double ce_count,
                                 std::vector<MoeFfnStats>& stats) override {
    if (dloss != 0.0) calls_.push_back("backward");
    return inner_->forward_backward(tokens, targets, batch, seq, dloss, ce_count, stats);
  }
  void begin_grad_reduce(Communicator& comm, GradReduceDtype dtype, size_t bucket_bytes) override {
    begun_ = &comm;
    calls_.push_back(fmt::format("begin {} {} {}", comm.size(),
                                 dtype == GradReduceDtype::kBfloat16 ? "bf16" : "fp32",
                                 bucket_bytes));
  }
  void all_reduce_grads(Communicator& comm, GradReduceDtype dtype) override {
    calls_.push_back(begun_ == nullptr ? "reduce"
                     : begun_ == &comm ? "reduce (same group)"
                                       : "reduce (other group)");
    begun_ = nullptr;
    inner_->all_reduce_grads(comm, dtype);
  }
  void all_reduce_grad_ranges(Communicator& comm, GradReduceDtype dtype,
                              const std::vector<ParamRange>& ranges) override {
    calls_.push_back(fmt::format("reduce {} ranges over {}", ranges.size(), comm.size()));
    begun_ = nullptr;
    inner_->all_reduce_grad_ranges(comm, dtype, ranges);
  }
  void sum_expert_group_grads(Communicator& group) override {
    calls_.push_back(fmt::format("expert sum {}", group.size()));
    inner_->sum_expert_group_grads(group);
  }
  StepUpdate update(double lr, double max_norm, bool loss_finite) override {
    return inner_->update(lr, max_norm, loss_finite);
  }
  std::string first_nonfinite_gradient() override { return inner_->first_nonfinite_gradient(); }
  ForwardFn forward_fn() override { return inner_->forward_fn(); }

 private:
  std::unique_ptr<StepEngine> inner_;
  std::vector<std::string>& calls_;
  Communicator* begun_ = nullptr;
};

// The trainer announces the last micro-batch of each step (begin_grad_reduce over the world with
// the config's dtype and bucket size), then reduces over the same group; one rank announces
// nothing.
TEST_F(TrainFixture, AnnouncesTheLastMicroBatchBeforeTheGradientSum) {
  TrainConfig c = config(2, 3);
  c.checkpoint.every_steps = 0;
  c.parallel.grad_reduce_dtype = "bf16";
  c.parallel.grad_bucket_mb = 0.5;
  for (const int num_ranks : {1, 2}) {
    std::vector<std::vector<std::string>> calls(static_cast<size_t>(num_ranks));
    testing::run_ranks(num_ranks, [&](Communicator& world) {
      TrainConfig mine = c;
      mine.checkpoint.dir =
          root_ / ("run-" + std::to_string(num_ranks) + "-" + std::to_string(world.rank()));
      TrainRunOptions options = no_progress();
      options.device = "cuda";
      std::vector<std::string>& log = calls[static_cast<size_t>(world.rank())];
      options.engine_factory = [&log](const std::string&, Transformer<float>& model,
                                      AdamW& optimizer) -> std::unique_ptr<StepEngine> {
        return std::make_unique<RecordingEngine>(make_cpu_step_engine(model, optimizer), log);
      };
      train(mine, options, world);
    });
    const std::string begin = fmt::format("begin {} bf16 {}", num_ranks, 512 * 1024);
    const std::vector<std::string> step =
        num_ranks == 1 ? std::vector<std::string>{"backward", "backward", "backward", "reduce"}
                       : std::vector<std::string>{"backward", "backward", begin, "backward",
                                                  "reduce (same group)"};
    std::vector<std::string> expected;
    for (int i = 0; i < 2; ++i) expected.insert(expected.end(), step.begin(), step.end());
    for (const std::vector<std::string>& rank_calls : calls) EXPECT_EQ(rank_calls, expected);
  }
}

// Under ZeRO-1 (expert_parallel 1) the announcement is over the data-parallel group that shards the
// optimizer, the one the sums onto the shard owners then run over.
TEST_F(TrainFixture, Zero1AnnouncesTheLastMicroBatchOverTheShardingGroup) {
  TrainConfig c = config(2, 2);
  c.checkpoint.every_steps = 0;
  c.parallel.zero_stage = 1;
  c.parallel.grad_bucket_mb = 0.25;
  std::vector<std::vector<std::string>> calls(2);
  testing::run_ranks(2, [&](Communicator& world) {
    TrainConfig mine = c;
    mine.checkpoint.dir = root_ / ("zero-run-" + std::to_string(world.rank()));
    TrainRunOptions options = no_progress();
    options.device = "cuda";
    std::vector<std::string>& log = calls[static_cast<size_t>(world.rank())];
    options.zero1_engine_factory = [&log](const std::string&, Transformer<float>& model,
                                          ZeroAdamW& optimizer) -> std::unique_ptr<StepEngine> {
      return std::make_unique<RecordingEngine>(make_cpu_zero1_step_engine(model, optimizer), log);
    };
    train(mine, options, world);
  });
  const std::vector<std::string> step = {"backward", fmt::format("begin 2 fp32 {}", 256 * 1024),
                                         "backward", "reduce (same group)"};
  std::vector<std::string> expected;
  for (int i = 0; i < 2; ++i) expected.insert(expected.end(), step.begin(), step.end());
  for (const std::vector<std::string>& rank_calls : calls) EXPECT_EQ(rank_calls, expected);
}

// Runs c on one rank with options and checks that it stops with an error containing `expected`.
void expect_train_error(const TrainConfig& c, const TrainRunOptions& options,
                        const std::string& expected) {
  SelfCommunicator self;
  try {
    train(c, options, self);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
}

// parallel.layout "tp" runs on the GPU engine (the trainer gets as far as asking for it), but not
// with what only the CPU engine or layout "sp_ep" runs: ZeRO-1, compressed expert exchanges and
// overlap chunks are refused before anything is built, naming the setting.
TEST_F(TrainFixture, TensorParallelLayoutOnTheGpuRefusesWhatItDoesNotRun) {
  TrainConfig c = config(3);
  c.parallel.layout = "tp";
  TrainRunOptions options = no_progress();
  options.device = "cuda";
  expect_train_error(c, options, "device 'cuda' is not available in this build");
  TrainConfig zero1 = c;
  zero1.parallel.zero_stage = 1;
  expect_train_error(
      zero1, options,
      "parallel.zero_stage 1 with parallel.layout \"tp\" runs on the CPU engine only");
  TrainConfig bf16 = c;
  bf16.parallel.ep_comm_dtype = "bf16";
  expect_train_error(bf16, options,
                     "parallel.ep_comm_dtype \"bf16\" compresses the expert-parallel "
                     "exchanges of parallel.layout \"sp_ep\"");
  TrainConfig chunks = c;
  chunks.parallel.ep_overlap_chunks = 2;
  expect_train_error(chunks, options,
                     "parallel.ep_overlap_chunks 2 overlaps the expert-parallel "
                     "exchanges of parallel.layout \"sp_ep\"");
  // The CPU engine runs ZeRO-1 under tp: only the check above refused it.
  SelfCommunicator self;
  EXPECT_EQ(train(zero1, no_progress(), self).steps, 3);
}

// The bf16 expert-parallel exchanges are the GPU engine's; the CPU engine refuses them.
TEST_F(TrainFixture, Bf16ExpertExchangesAreRefusedOnTheCpuEngine) {
  TrainConfig c = config(3);
  c.parallel.ep_comm_dtype = "bf16";
  expect_train_error(
      c, no_progress(),
      "parallel.ep_comm_dtype \"bf16\" compresses the GPU engine's expert-parallel exchanges");
}

}  // namespace
}  // namespace moeforge

namespace moeforge {
namespace {

// A checkpoint whose o_proj weights hold an infinity, so every loss is non-finite.
std::filesystem::path write_poisoned_model(const std::filesystem::path& root,
                                           const std::filesystem::path& model_json) {
  const ModelConfig c = load_model_config(model_json);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  model.init_random(1, 0.02);
  model.params()[model.layout().layer(1).o_proj] = std::numeric_limits<float>::infinity();
  const std::filesystem::path dir = root / "poisoned";
  std::filesystem::create_directories(dir);
  write_hf_model(dir, c, model.layout(), model.params().data(), io::DType::kF32);
  return dir;
}

TEST_F(TrainFixture, NonFiniteLossStopsWithStepAndTensor) {
  TrainConfig c = config(3);
  c.model.model_config.clear();
  c.model.init_from = write_poisoned_model(root_, root_ / "model.json");
  SelfCommunicator self;
  try {
    train(c, no_progress(), self);
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("step 1: non-finite loss"), std::string::npos) << message;
    EXPECT_NE(message.find("lm_head.weight"), std::string::npos) << message;
    EXPECT_NE(message.find("stopping"), std::string::npos) << message;
  }
  EXPECT_TRUE(io::read_checkpoint_index(root_ / "run").empty());
}

TEST_F(TrainFixture, NonFiniteLossSkipsTheUpdateWhenConfigured) {
  TrainConfig c = config(3);
  c.model.model_config.clear();
  c.model.init_from = write_poisoned_model(root_, root_ / "model.json");
  c.optimizer.on_nonfinite = "skip";
  SelfCommunicator self;
  train(c, no_progress(), self);
  int skipped = 0;
  for (const auto& m : read_metrics(root_ / "run" / "metrics.jsonl")) {
    if (m.value("event", "") == "nonfinite_skipped") ++skipped;
    EXPECT_FALSE(m.contains("loss")) << m.dump();  // no step was logged as trained
  }
  EXPECT_EQ(skipped, 3);
  // The weights were never updated: the saved model still equals the poisoned one.
  const std::vector<float> saved = read_weights(root_ / "run" / "checkpoints" / "step-00000003");
  const std::vector<float> original = read_weights(root_ / "poisoned");
  EXPECT_EQ(0, std::memcmp(saved.data(), original.data(), saved.size() * sizeof(float)));
}

}  // namespace
}  // namespace moeforge

namespace moeforge {
namespace {

TEST_F(TrainFixture, PmaMergesInTheBackgroundAndLogsBothLosses) {
  TrainConfig c = config(6);
  c.checkpoint.every_steps = 0;
  c.checkpoint.keep_last = 1;
  c.pma.enabled = true;
  c.pma.interval_tokens = 2 * 4 * 16;  // a checkpoint every 2 steps
  c.pma.every_steps = 3;
  c.pma.count = 2;
  SelfCommunicator self;
  train(c, no_progress(), self);

  std::vector<nlohmann::json> pma_records;
  for (const auto& m : read_metrics(root_ / "run" / "metrics.jsonl")) {
    if (m.contains("pma_val_loss") || m.contains("pma_error")) pma_records.push_back(m);
  }
  // Step 3: checkpoints at steps 2 only -> too few; step 6: steps 4 and 6 (spaced 2 steps apart).
  ASSERT_EQ(pma_records.size(), 1u);
  const nlohmann::json& r = pma_records[0];
  ASSERT_FALSE(r.contains("pma_error")) << r.dump();
  EXPECT_EQ(r.at("step").get<int64_t>(), 6);
  EXPECT_EQ(r.at("pma_first").get<std::string>(), "step-00000004");
  EXPECT_EQ(r.at("pma_last").get<std::string>(), "step-00000006");
  EXPECT_TRUE(std::isfinite(r.at("pma_val_loss").get<double>()));
  EXPECT_TRUE(std::isfinite(r.at("val_loss").get<double>()));

  // pma/latest is the SMA of the two checkpoints, element by element in the pinned arithmetic.
  const std::vector<float> a = read_weights(root_ / "run" / "checkpoints" / "step-00000004");
  const std::vector<float> b = read_weights(root_ / "run" / "checkpoints" / "step-00000006");
  const std::vector<float> merged = read_weights(root_ / "run" / "pma" / "latest");
  for (size_t i = 0; i < merged.size(); ++i) {
    const float half = 0.5f;
    const float expected = (0.0f + half * a[i]) + half * b[i];
    ASSERT_EQ(merged[i], expected) << i;
  }
  // Retention kept the checkpoints the merge needed although keep_last is 1.
  EXPECT_TRUE(std::filesystem::exists(root_ / "run" / "checkpoints" / "step-00000004"));
  EXPECT_FALSE(std::filesystem::exists(root_ / "run" / "checkpoints" / "step-00000002"));
}

}  // namespace
}  // namespace moeforge
