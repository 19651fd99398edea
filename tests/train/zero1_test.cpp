// ZeRO-1 against the unsharded AdamW over 2 and 3 in-process ranks (3 gives uneven shards), with
// fp32 and bf16 gradient reduction: the shard rule, parameters and moments after several clipped
// steps, the gradient norm, the state held per rank, the non-finite report, and checkpoints that
// do not depend on the sharding.
#include "train/zero_optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/forwarding_communicator.h"
#include "core/rng.h"
#include "model/model_test_configs.h"
#include "model/thread_communicator.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/step_engine.h"
#include "train/train_fixture.h"
#include "train/trainer.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

// The ranks of another communicator, with float sums (all-reduce, reduce-scatter) built from its
// all-gather as rank-order sums that start from rank 0's value, as MpiCommunicator sums (the
// in-process ThreadCommunicator's float sums start from zero, which turns a -0 into +0).
class FloatSumCommunicator final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;
  std::string name() const override { return "float-sum(" + inner_.name() + ")"; }
  void all_reduce_sum(void* data, size_t count, CommDType dtype) override {
    if (dtype != CommDType::kFloat32) return inner_.all_reduce_sum(data, count, dtype);
    const std::vector<float> sum = rank_order_sum(static_cast<const float*>(data), count, 0, count);
    std::memcpy(data, sum.data(), count * sizeof(float));
  }
  void reduce_scatter_sum(const void* send, void* recv, size_t count, CommDType dtype) override {
    if (dtype != CommDType::kFloat32) return inner_.reduce_scatter_sum(send, recv, count, dtype);
    const std::vector<float> sum =
        rank_order_sum(static_cast<const float*>(send), count * static_cast<size_t>(size()),
                       static_cast<size_t>(rank()) * count, count);
    std::memcpy(recv, sum.data(), count * sizeof(float));
  }

 private:
  // Elements [offset, offset + count) of every rank's data [total], summed in rank order.
  std::vector<float> rank_order_sum(const float* data, size_t total, size_t offset, size_t count) {
    std::vector<float> all(total * static_cast<size_t>(size()));  // [ranks, total]
    inner_.all_gather(data, all.data(), total);
    std::vector<float> sum(all.begin() + offset, all.begin() + offset + count);
    for (size_t r = 1; r < static_cast<size_t>(size()); ++r) {
      for (size_t i = 0; i < count; ++i) sum[i] += all[r * total + offset + i];
    }
    return sum;
  }
};

constexpr int kNumSteps = 4;
constexpr double kMaxNorm = 0.2;  // below the first steps' gradient norms, so clipping is tested
const std::vector<std::string> kNoDecay = {"norm", "bias"};

// A tiny MoE model whose parameter count is not a multiple of 3.
ModelConfig test_model_config() {
  ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  c.vocab_size = 14;
  return c;
}

// What one rank ends a run with.
struct RankRun {
  std::vector<float> params;
  std::vector<double> grad_norms;          // per step
  std::vector<float> exp_avg, exp_avg_sq;  // the moments this rank holds
  ZeroShard shard;                         // the range of the moments
  int64_t step_count = 0;
};

// kNumSteps steps on dp's ranks, each rank on its own tokens, with zero_stage 0 or 1; with
// save_dir, rank 0 saves a checkpoint there at the end.
RankRun train_rank(Communicator& dp, int zero_stage, GradReduceDtype dtype,
                   const fs::path& save_dir = {}) {
  SelfCommunicator self;
  Transformer<float> model(test_model_config(), self);
  model.init_random(5, 0.5);
  const AdamWHyper hyper;
  std::unique_ptr<AdamW> adamw;
  std::unique_ptr<ZeroAdamW> zero;
  std::unique_ptr<StepEngine> engine;
  if (zero_stage == 1) {
    zero = std::make_unique<ZeroAdamW>(model.layout(), hyper, kNoDecay, dp);
    engine = make_cpu_zero1_step_engine(model, *zero);
  } else {
    adamw = std::make_unique<AdamW>(model.layout(), hyper, kNoDecay);
    engine = make_cpu_step_engine(model, *adamw);
  }
  constexpr int64_t kBatch = 2, kSeq = 8;
  RankRun run;
  for (int step = 0; step < kNumSteps; ++step) {
    Rng rng(1000 + 10 * step + dp.rank());
    std::vector<int32_t> tokens(kBatch * kSeq), targets(kBatch * kSeq);
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = static_cast<int32_t>(rng.below(13));
      targets[i] = static_cast<int32_t>(rng.below(13));
    }
    engine->zero_grads();
    std::vector<MoeFfnStats> stats;
    engine->forward_backward(tokens.data(), targets.data(), kBatch, kSeq, 1.0 / dp.size(), 0.0,
                             stats);
    engine->all_reduce_grads(dp, dtype);
    const StepUpdate update = engine->update(1e-2, kMaxNorm, true);
    EXPECT_TRUE(update.applied);
    run.grad_norms.push_back(update.grad_norm);
  }
  run.params = model.params();
  if (zero) {
    run.exp_avg = zero->exp_avg();
    run.exp_avg_sq = zero->exp_avg_sq();
    run.shard = zero->shard();
    run.step_count = zero->step_count();
  } else {
    run.exp_avg = adamw->exp_avg();
    run.exp_avg_sq = adamw->exp_avg_sq();
    run.shard = ZeroShard{0, model.layout().num_params()};
    run.step_count = adamw->step_count();
  }
  if (!save_dir.empty()) {
    std::vector<float> exp_avg = run.exp_avg, exp_avg_sq = run.exp_avg_sq;
    if (zero) zero->gather_state(exp_avg, exp_avg_sq);
    if (dp.rank() == 0) {
      TrainerState state;
      state.step = kNumSteps;
      save_checkpoint(save_dir, model,
                      AdamWStateRange{0, model.layout().num_params(), exp_avg.data(),
                                      exp_avg_sq.data(), run.step_count},
                      state, nlohmann::json::object(), {}, 0);
    }
  }
  return run;
}

// Runs fn on num_ranks in-process ranks (with float sums) and returns each rank's result.
std::vector<RankRun> run_ranks(int num_ranks, const std::function<RankRun(Communicator&)>& fn) {
  std::vector<RankRun> runs(static_cast<size_t>(num_ranks));
  testing::run_ranks(num_ranks, [&](Communicator& comm) {
    FloatSumCommunicator dp(comm);
    runs[static_cast<size_t>(comm.rank())] = fn(dp);
  });
  return runs;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(ZeroShard, SplitsTheFlatBufferIntoCeilSizedContiguousShards) {
  EXPECT_EQ(zero_shard_len(10, 3), 4);
  const ZeroShard expected_10_3[] = {{0, 4}, {4, 8}, {8, 10}};
  const ZeroShard expected_5_4[] = {{0, 2}, {2, 4}, {4, 5}, {5, 5}};
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(zero_shard(10, 3, r).begin, expected_10_3[r].begin);
    EXPECT_EQ(zero_shard(10, 3, r).end, expected_10_3[r].end);
  }
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(zero_shard(5, 4, r).begin, expected_5_4[r].begin);
    EXPECT_EQ(zero_shard(5, 4, r).end, expected_5_4[r].end);
  }
  for (int64_t n : {0, 1, 7, 12, 1001}) {
    for (int64_t d : {1, 2, 3, 5}) {
      int64_t next = 0;
      for (int64_t r = 0; r < d; ++r) {
        const ZeroShard s = zero_shard(n, d, r);
        EXPECT_EQ(s.begin, next) << n << " over " << d;
        EXPECT_LE(s.size(), zero_shard_len(n, d));
        EXPECT_GE(s.size(), 0);
        next = s.end;
      }
      EXPECT_EQ(next, n) << n << " over " << d;
    }
  }
  EXPECT_THROW(zero_shard(10, 3, 3), Error);
}

struct ZeroCase {
  int num_ranks;
  GradReduceDtype dtype;
};

class ZeroMatchesUnsharded : public ::testing::TestWithParam<ZeroCase> {};

// The parameters and moments compare bit for bit: every element's summed gradient is the same
// rank-ordered float sum in both runs, and the update is element-wise (zero_optimizer.h). The
// gradient norm differs by the grouping of its double sum only: 1e-12 relative.
TEST_P(ZeroMatchesUnsharded, ParametersMomentsAndGradNormAfterClippedSteps) {
  const ZeroCase c = GetParam();
  const int64_t num_params = ParameterLayout(test_model_config()).num_params();
  ASSERT_NE(num_params % 3, 0) << "the 3-rank case must have uneven shards";
  const std::vector<RankRun> full =
      run_ranks(c.num_ranks, [&](Communicator& dp) { return train_rank(dp, 0, c.dtype); });
  const std::vector<RankRun> zero =
      run_ranks(c.num_ranks, [&](Communicator& dp) { return train_rank(dp, 1, c.dtype); });
  ASSERT_GT(full[0].grad_norms[0], kMaxNorm) << "clipping must be active in the first step";
  int64_t total_state = 0;
  for (int r = 0; r < c.num_ranks; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const RankRun& z = zero[static_cast<size_t>(r)];
    EXPECT_EQ(z.params, full[0].params);
    for (int step = 0; step < kNumSteps; ++step) {
      EXPECT_NEAR(z.grad_norms[step], full[0].grad_norms[step], 1e-12 * full[0].grad_norms[step]);
    }
    const ZeroShard expected = zero_shard(num_params, c.num_ranks, r);
    EXPECT_EQ(z.shard.begin, expected.begin);
    EXPECT_EQ(z.shard.end, expected.end);
    ASSERT_EQ(static_cast<int64_t>(z.exp_avg.size()), expected.size());
    ASSERT_EQ(static_cast<int64_t>(z.exp_avg_sq.size()), expected.size());
    EXPECT_LE(expected.size(), (num_params + c.num_ranks - 1) / c.num_ranks);
    total_state += expected.size();
    EXPECT_EQ(z.exp_avg, std::vector<float>(full[0].exp_avg.begin() + expected.begin,
                                            full[0].exp_avg.begin() + expected.end));
    EXPECT_EQ(z.exp_avg_sq, std::vector<float>(full[0].exp_avg_sq.begin() + expected.begin,
                                               full[0].exp_avg_sq.begin() + expected.end));
    EXPECT_EQ(z.step_count, kNumSteps);
  }
  EXPECT_EQ(total_state, num_params);
}

INSTANTIATE_TEST_SUITE_P(RanksAndDtypes, ZeroMatchesUnsharded,
                         ::testing::Values(ZeroCase{2, GradReduceDtype::kFloat32},
                                           ZeroCase{3, GradReduceDtype::kFloat32},
                                           ZeroCase{2, GradReduceDtype::kBfloat16},
                                           ZeroCase{3, GradReduceDtype::kBfloat16}),
                         [](const ::testing::TestParamInfo<ZeroCase>& info) {
                           return std::to_string(info.param.num_ranks) + "ranks_" +
                                  (info.param.dtype == GradReduceDtype::kFloat32 ? "fp32" : "bf16");
                         });

// A NaN in one rank's gradient of a tensor that spans two shards is found by the rank that owns
// that part, and every rank reports the same tensor as the unsharded engine would.
TEST(ZeroAdamW, ReportsTheFirstNonfiniteGradientInBackwardOrder) {
  const ParameterLayout layout(test_model_config());
  const ZeroShard last_shard = zero_shard(layout.num_params(), 3, 2);
  size_t straddling_idx = 0;  // a tensor that the last shard starts inside of
  for (size_t s = 0; s < layout.specs().size(); ++s) {
    const ParamSpec& spec = layout.specs()[s];
    if (spec.offset < last_shard.begin && spec.offset + spec.numel > last_shard.begin) {
      straddling_idx = s;
    }
  }
  const ParamSpec& bad = layout.specs()[straddling_idx];
  ASSERT_LT(bad.offset, last_shard.begin);
  std::vector<std::string> reports(3);
  std::mutex mutex;
  testing::run_ranks(3, [&](Communicator& comm) {
    FloatSumCommunicator dp(comm);
    SelfCommunicator self;
    Transformer<float> model(test_model_config(), self);
    ZeroAdamW zero(model.layout(), AdamWHyper{}, kNoDecay, dp);
    auto engine = make_cpu_zero1_step_engine(model, zero);
    engine->zero_grads();
    if (dp.rank() == 1) {
      model.grads()[static_cast<size_t>(bad.offset + bad.numel - 1)] =
          std::numeric_limits<float>::quiet_NaN();
    }
    engine->all_reduce_grads(dp, GradReduceDtype::kFloat32);
    const StepUpdate update = engine->update(1e-2, 1.0, true);
    EXPECT_FALSE(update.applied);
    EXPECT_TRUE(std::isnan(update.grad_norm));
    const std::string report = engine->first_nonfinite_gradient();
    std::lock_guard<std::mutex> lock(mutex);
    reports[static_cast<size_t>(dp.rank())] = report;
  });
  for (const std::string& report : reports) EXPECT_EQ(report, bad.name);
}

class ZeroCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("moeforge-zero1-" + std::to_string(::getpid()));
    fs::remove_all(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  fs::path root_;
};

// A checkpoint saved with ZeRO-1 on 3 ranks (uneven shards gathered to rank 0) holds the same bytes
// as one saved without ZeRO, and loading it on 2 ranks, or into one unsharded AdamW, gives each
// its part of the moments.
TEST_F(ZeroCheckpoint, FilesDoNotDependOnTheShardingAndLoadIntoAnyOther) {
  const fs::path full_dir = root_ / "full", zero_dir = root_ / "zero";
  run_ranks(
      3, [&](Communicator& dp) { return train_rank(dp, 0, GradReduceDtype::kFloat32, full_dir); });
  const std::vector<RankRun> zero = run_ranks(
      3, [&](Communicator& dp) { return train_rank(dp, 1, GradReduceDtype::kFloat32, zero_dir); });
  const fs::path full_ckpt = checkpoint_dir_name(full_dir, kNumSteps);
  const fs::path zero_ckpt = checkpoint_dir_name(zero_dir, kNumSteps);
  for (const char* file : {"optimizer.safetensors", "model.safetensors"}) {
    const std::string bytes = read_bytes(zero_ckpt / file);
    EXPECT_FALSE(bytes.empty()) << file;
    EXPECT_EQ(bytes, read_bytes(full_ckpt / file)) << file;
  }

  // Every rank's shard of the moments, read from the checkpoint with ZeroAdamW's shard rule.
  std::vector<float> full_exp_avg(zero[0].params.size()), full_exp_avg_sq(zero[0].params.size());
  for (const RankRun& r : zero) {
    std::copy(r.exp_avg.begin(), r.exp_avg.end(), full_exp_avg.begin() + r.shard.begin);
    std::copy(r.exp_avg_sq.begin(), r.exp_avg_sq.end(), full_exp_avg_sq.begin() + r.shard.begin);
  }
  const std::vector<RankRun> loaded = run_ranks(2, [&](Communicator& dp) {
    SelfCommunicator self;
    Transformer<float> model(test_model_config(), self);
    ZeroAdamW optimizer(model.layout(), AdamWHyper{}, kNoDecay, dp);
    AdamWStateRange range{optimizer.shard().begin, optimizer.shard().end,
                          optimizer.exp_avg().data(), optimizer.exp_avg_sq().data()};
    const TrainerState state = load_checkpoint(zero_ckpt, model, range);
    EXPECT_EQ(state.step, kNumSteps);
    RankRun run;
    run.params = model.params();
    run.exp_avg = optimizer.exp_avg();
    run.exp_avg_sq = optimizer.exp_avg_sq();
    run.shard = optimizer.shard();
    run.step_count = range.step_count;
    return run;
  });
  for (const RankRun& r : loaded) {
    EXPECT_EQ(r.params, zero[0].params);
    EXPECT_EQ(r.step_count, kNumSteps);
    EXPECT_EQ(r.exp_avg, std::vector<float>(full_exp_avg.begin() + r.shard.begin,
                                            full_exp_avg.begin() + r.shard.end));
    EXPECT_EQ(r.exp_avg_sq, std::vector<float>(full_exp_avg_sq.begin() + r.shard.begin,
                                               full_exp_avg_sq.begin() + r.shard.end));
  }

  // And into one unsharded optimizer.
  SelfCommunicator self;
  Transformer<float> model(test_model_config(), self);
  AdamW adamw(model.layout(), AdamWHyper{}, kNoDecay);
  load_checkpoint(zero_ckpt, model, adamw);
  EXPECT_EQ(adamw.exp_avg(), full_exp_avg);
  EXPECT_EQ(adamw.exp_avg_sq(), full_exp_avg_sq);
  EXPECT_EQ(adamw.step_count(), kNumSteps);
}

using ZeroTrainer = testing::TrainFixture;

// The trainer on one rank with zero_stage 1 (one shard: the whole state, through the sharded
// code path: reduce-scatter, all-gather, gather for saving, range load) writes the same
// checkpoint files as zero_stage 0, and resumes from a zero_stage 0 checkpoint to the same end.
TEST_F(ZeroTrainer, OneRankZero1TrainsSavesAndResumesLikeZero0) {
  SelfCommunicator self;
  TrainRunOptions options;
  options.progress = false;
  TrainConfig zero0 = config(6);
  zero0.checkpoint.dir = root_ / "zero0";
  zero0.log.metrics_file = root_ / "zero0.jsonl";
  TrainConfig zero1 = zero0;
  zero1.parallel.zero_stage = 1;
  zero1.checkpoint.dir = root_ / "zero1";
  zero1.log.metrics_file = root_ / "zero1.jsonl";
  const TrainSummary a = train(zero0, options, self);
  const TrainSummary b = train(zero1, options, self);
  EXPECT_EQ(a.final_loss, b.final_loss);
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    EXPECT_EQ(read_bytes(a.last_checkpoint / file), read_bytes(b.last_checkpoint / file)) << file;
  }
  TrainConfig resumed = zero1;
  resumed.checkpoint.dir = root_ / "resumed";
  resumed.log.metrics_file = root_ / "resumed.jsonl";
  options.resume = checkpoint_dir_name(zero0.checkpoint.dir, 3);
  const TrainSummary c = train(resumed, options, self);
  EXPECT_EQ(c.final_loss, a.final_loss);
  EXPECT_EQ(read_bytes(c.last_checkpoint / "optimizer.safetensors"),
            read_bytes(a.last_checkpoint / "optimizer.safetensors"));
}

TEST_F(ZeroTrainer, ZeroStageIsValidated) {
  nlohmann::json j = train_config_to_json(config(2));
  j["parallel"]["zero_stage"] = 2;
  try {
    train_config_from_json(j, root_);
    ADD_FAILURE() << "zero_stage 2 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.zero_stage must be 0"), std::string::npos)
        << e.what();
  }
}

// With zero_stage 1 on another device the trainer builds that device's ZeRO-1 engine (here the
// CPU one under the name "cuda") around its sharded optimizer, never the unsharded engine, and
// trains as the CPU device does; without such a factory it refuses.
TEST_F(ZeroTrainer, OtherDevicesGetTheirZero1Engine) {
  TrainConfig c = config(3);
  c.parallel.zero_stage = 1;
  SelfCommunicator self;
  TrainRunOptions options;
  options.progress = false;
  const TrainSummary on_cpu = train(c, options, self);

  options.device = "cuda";
  options.engine_factory = [](const std::string&, Transformer<float>&,
                              AdamW&) -> std::unique_ptr<StepEngine> {
    ADD_FAILURE() << "the unsharded engine was built with zero_stage 1";
    return nullptr;
  };
  try {
    train(c, options, self);
    ADD_FAILURE() << "zero_stage 1 ran on a device without a ZeRO-1 engine";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("device 'cuda' is not available"), std::string::npos)
        << e.what();
  }

  int built = 0;
  options.zero1_engine_factory = [&built](const std::string& device, Transformer<float>& model,
                                          ZeroAdamW& optimizer) {
    EXPECT_EQ(device, "cuda");
    EXPECT_EQ(optimizer.shard().size(), model.layout().num_params());
    ++built;
    return make_cpu_zero1_step_engine(model, optimizer);
  };
  c.checkpoint.dir = root_ / "cuda-named";
  c.log.metrics_file = root_ / "cuda-named.jsonl";
  const TrainSummary named_cuda = train(c, options, self);
  EXPECT_EQ(built, 1);
  EXPECT_EQ(named_cuda.final_loss, on_cpu.final_loss);
}

}  // namespace
}  // namespace moeforge
