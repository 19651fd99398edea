// Tests of the training config: defaults, overrides, unknown keys, path resolution, validation
// messages naming the key path, and the round trip through train_config_to_json.
#include "train/train_config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/model_config.h"

namespace moeforge {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The smallest valid config: everything else comes from the defaults.
const json kMinimal = json::parse(R"({
  "model": {"model_config": "/models/tiny.json"},
  "data": {"dataset": "/data/tiny"},
  "schedule": {"max_steps": 100}
})");

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A fresh folder under the test temp dir holding a config file with the given content.
fs::path write_config(const std::string& name, const std::string& content) {
  const fs::path dir = fs::path(::testing::TempDir()) / "train_config_test" / name;
  fs::create_directories(dir);
  const fs::path path = dir / "train.json";
  std::ofstream(path) << content;
  return path;
}

TEST(TrainConfigTest, DefaultsFillEverythingNotGiven) {
  const TrainConfig c = train_config_from_json(kMinimal, "");
  EXPECT_EQ(c.model.model_config, fs::path("/models/tiny.json"));
  EXPECT_TRUE(c.model.init_from.empty());
  EXPECT_EQ(c.model.seed, 1234u);
  EXPECT_DOUBLE_EQ(c.model.init_std, 0.02);
  EXPECT_EQ(c.data.seq_len, 256);
  EXPECT_EQ(c.data.micro_batch_size, 8);
  EXPECT_EQ(c.data.grad_accum_steps, 1);
  EXPECT_EQ(c.data.seed, 42u);
  EXPECT_EQ(c.data.windows, "stream");
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 3e-4);
  EXPECT_DOUBLE_EQ(c.optimizer.beta1, 0.9);
  EXPECT_DOUBLE_EQ(c.optimizer.beta2, 0.95);
  EXPECT_DOUBLE_EQ(c.optimizer.eps, 1e-8);
  EXPECT_DOUBLE_EQ(c.optimizer.weight_decay, 0.1);
  EXPECT_EQ(c.optimizer.no_decay, (std::vector<std::string>{"norm", "embed_tokens", "bias"}));
  EXPECT_DOUBLE_EQ(c.optimizer.grad_clip, 1.0);
  EXPECT_EQ(c.schedule.type, ScheduleType::kCosine);
  EXPECT_EQ(c.schedule.warmup_steps, 0);
  EXPECT_EQ(c.schedule.max_steps, 100);
  EXPECT_DOUBLE_EQ(c.schedule.min_lr_ratio, 0.1);
  EXPECT_FALSE(c.schedule.decay_steps);
  EXPECT_FALSE(c.schedule.decay_fraction);
  EXPECT_EQ(c.schedule.decay_shape, DecayShape::kLinear);
  EXPECT_EQ(c.checkpoint.dir, fs::path("runs/default"));
  EXPECT_EQ(c.checkpoint.every_steps, 0);
  EXPECT_EQ(c.checkpoint.keep_last, 0);
  EXPECT_EQ(c.eval.every_steps, 0);
  EXPECT_EQ(c.eval.max_batches, 16);
  EXPECT_EQ(c.log.every_steps, 1);
  EXPECT_EQ(c.log.metrics_file, fs::path("runs/default/metrics.jsonl"));
  EXPECT_EQ(c.parallel.layout, "sp_ep");
}

TEST(TrainConfigTest, MetricsFileFollowsTheRunDirUnlessSet) {
  json j = kMinimal;
  j["checkpoint"]["dir"] = "runs/x";
  EXPECT_EQ(train_config_from_json(j, "").log.metrics_file, fs::path("runs/x/metrics.jsonl"));
  j["log"]["metrics_file"] = "/tmp/m.jsonl";
  EXPECT_EQ(train_config_from_json(j, "").log.metrics_file, fs::path("/tmp/m.jsonl"));
}

TEST(TrainConfigTest, RelativePathsResolveAgainstTheConfigFolder) {
  json j = kMinimal;
  j["model"]["model_config"] = "../models/tiny-moe.json";
  j["data"]["dataset"] = "data/set";
  j["checkpoint"]["dir"] = "runs/demo";
  TrainConfig c = train_config_from_json(j, "/repo/configs/train");
  EXPECT_EQ(c.model.model_config, fs::path("/repo/configs/models/tiny-moe.json"));
  EXPECT_EQ(c.data.dataset, fs::path("/repo/configs/train/data/set"));
  EXPECT_EQ(c.checkpoint.dir, fs::path("runs/demo"));  // the run dir is relative to the cwd

  j["model"]["model_config"] = "";
  j["model"]["init_from"] = "../../runs/old";
  c = train_config_from_json(j, "/repo/configs/train");
  EXPECT_EQ(c.model.init_from, fs::path("/repo/runs/old"));

  j["model"]["init_from"] = "/abs/run";
  EXPECT_EQ(train_config_from_json(j, "/elsewhere").model.init_from, fs::path("/abs/run"));
}

TEST(TrainConfigTest, LoadsTheDemoConfigAndItsModel) {
  const fs::path source = MOEFORGE_SOURCE_DIR;
  const TrainConfig c = load_train_config(source / "configs/train/demo.json", {});
  EXPECT_EQ(c.model.model_config, (source / "configs/models/tiny-moe.json").lexically_normal());
  EXPECT_EQ(c.data.dataset, (source / "data/fortunes-byte").lexically_normal());
  EXPECT_TRUE(c.data.dataset.is_absolute());
  EXPECT_EQ(c.schedule.type, ScheduleType::kWsd);
  EXPECT_EQ(c.checkpoint.dir, fs::path("runs/demo"));
  const ModelConfig model = load_model_config(c.model.model_config);
  EXPECT_LE(c.data.seq_len, model.max_position_embeddings);
}

TEST(TrainConfigTest, OverridesSetNestedKeysWithJsonOrStringValues) {
  const fs::path path = write_config("overrides", kMinimal.dump());
  const TrainConfig c =
      load_train_config(path, {"optimizer.lr=1e-3", "schedule.type=wsd", "schedule.decay_steps=10",
                               "schedule.decay_shape=\"sqrt\"", "optimizer.no_decay=[\"norm\"]",
                               "checkpoint.dir=runs/x y", "data.seq_len=64", "data.seq_len=128",
                               "eval={\"max_batches\": 4}"});
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 1e-3);
  EXPECT_EQ(c.schedule.type, ScheduleType::kWsd);
  EXPECT_EQ(c.schedule.decay_steps, 10);
  EXPECT_EQ(c.schedule.decay_shape, DecayShape::kSqrt);
  EXPECT_EQ(c.optimizer.no_decay, (std::vector<std::string>{"norm"}));
  EXPECT_EQ(c.checkpoint.dir, fs::path("runs/x y"));
  EXPECT_EQ(c.data.seq_len, 128);  // the last override wins
  EXPECT_EQ(c.eval.max_batches, 4);
  EXPECT_EQ(c.eval.every_steps, 0);  // a section override merges key by key
}

TEST(TrainConfigTest, PathOverridesResolveAgainstTheWorkingDirectory) {
  const fs::path path = write_config("path_override", kMinimal.dump());
  const TrainConfig c = load_train_config(path, {"data.dataset=data/other"});
  EXPECT_EQ(c.data.dataset, (fs::current_path() / "data/other").lexically_normal());
}

TEST(TrainConfigTest, OverrideErrorsNameTheKey) {
  const fs::path path = write_config("override_errors", kMinimal.dump());
  auto load_error = [&](const std::string& override_text) {
    return error_of([&] { load_train_config(path, {override_text}); });
  };
  std::string message = load_error("data.seq_len=abc");
  EXPECT_NE(message.find("data.seq_len must be an integer, got \"abc\""), std::string::npos)
      << message;
  message = load_error("optimizer.betta2=0.9");
  EXPECT_NE(message.find("--set optimizer.betta2=0.9: unknown key \"optimizer.betta2\" (did you "
                         "mean \"optimizer.beta2\"?); valid keys in optimizer: beta1, beta2, eps, "
                         "grad_clip, lr, no_decay, on_nonfinite, "
                         "weight_decay"),
            std::string::npos)
      << message;
  message = load_error("optimiser.lr=1");
  EXPECT_NE(message.find("did you mean \"optimizer\"?"), std::string::npos) << message;
  EXPECT_NE(message.find("valid keys at the top level: checkpoint, data, eval, log, model, "
                         "optimizer, parallel, pma, schedule"),
            std::string::npos)
      << message;
  message = load_error("optimizer.lr.value=1");
  EXPECT_NE(message.find("optimizer.lr is a value, not a section"), std::string::npos) << message;
  message = load_error("data=3");
  EXPECT_NE(message.find("data must be an object (a section), got 3"), std::string::npos)
      << message;
  message = load_error("optimizer.lr");
  EXPECT_NE(message.find("expected key.path=value"), std::string::npos) << message;
  message = load_error("schedule.type=linear");
  EXPECT_NE(message.find("schedule.type must be one of constant, cosine, wsd, got \"linear\""),
            std::string::npos)
      << message;
  message = load_error("zzzzzz=1");
  EXPECT_EQ(message.find("did you mean"), std::string::npos) << message;
}

TEST(TrainConfigTest, UnknownKeysInTheFileAreErrors) {
  json j = kMinimal;
  j["optimizer"]["weight_decya"] = 0.1;
  const fs::path path = write_config("unknown_key", j.dump());
  const std::string message = error_of([&] { load_train_config(path, {}); });
  EXPECT_NE(message.find(path.string() + ": unknown key \"optimizer.weight_decya\" (did you mean "
                                         "\"optimizer.weight_decay\"?)"),
            std::string::npos)
      << message;
  EXPECT_NE(
      message.find(
          "valid keys in optimizer: beta1, beta2, eps, grad_clip, lr, no_decay, on_nonfinite, "
          "weight_decay"),
      std::string::npos)
      << message;

  json top = kMinimal;
  top["trainer"] = json::object();
  EXPECT_NE(error_of([&] { train_config_from_json(top, ""); }).find("unknown key \"trainer\""),
            std::string::npos);
  EXPECT_NE(error_of([&] { train_config_from_json(json::array(), ""); }).find("must be an object"),
            std::string::npos);
}

TEST(TrainConfigTest, LoadReportsFileProblems) {
  EXPECT_NE(error_of([] {
              load_train_config("/no/such/train.json", {});
            }).find("cannot open training config /no/such/train.json"),
            std::string::npos);
  const fs::path path = write_config("broken", "{\"model\": ");
  EXPECT_NE(error_of([&] { load_train_config(path, {}); }).find(path.string() + ": invalid JSON"),
            std::string::npos);
}

// Each case sets one key of the minimal config and expects the error to name the key path.
TEST(TrainConfigTest, EveryInvalidValueIsNamedByItsKeyPath) {
  struct Case {
    const char* section;
    const char* key;
    json value;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"model", "init_from", "/runs/old",
       "set exactly one of model.model_config and model.init_from"},
      {"model", "model_config", "", "set exactly one of model.model_config and model.init_from"},
      {"model", "init_std", 0.0, "model.init_std must be > 0, got 0"},
      {"model", "seed", -1, "model.seed must be a non-negative integer, got -1"},
      {"model", "init_std", "big", "model.init_std must be a number, got \"big\""},
      {"data", "dataset", "", "data.dataset must be set"},
      {"data", "seq_len", 0, "data.seq_len must be > 0, got 0"},
      {"data", "micro_batch_size", -2, "data.micro_batch_size must be > 0, got -2"},
      {"data", "grad_accum_steps", 0, "data.grad_accum_steps must be > 0"},
      {"data", "seed", 1.5, "data.seed must be a non-negative integer, got 1.5"},
      {"data", "seq_len", 3.5, "data.seq_len must be an integer, got 3.5"},
      {"optimizer", "lr", 0.0, "optimizer.lr must be > 0"},
      {"optimizer", "beta1", -0.1, "optimizer.beta1 must be in [0, 1), got -0.1"},
      {"optimizer", "beta2", 1.5, "optimizer.beta2 must be in [0, 1), got 1.5"},
      {"optimizer", "beta2", 1.0, "optimizer.beta2 must be in [0, 1), got 1"},
      {"optimizer", "eps", 0.0, "optimizer.eps must be > 0"},
      {"optimizer", "weight_decay", -0.1, "optimizer.weight_decay must be >= 0"},
      {"optimizer", "grad_clip", -1.0, "optimizer.grad_clip must be >= 0"},
      {"optimizer", "no_decay", "norm", "optimizer.no_decay must be a list of strings"},
      {"optimizer", "no_decay", json({"norm", 3}), "optimizer.no_decay must be a list of strings"},
      {"optimizer", "no_decay", json({""}), "optimizer.no_decay entries must be non-empty"},
      {"schedule", "max_steps", 0, "schedule.max_steps must be > 0, got 0"},
      {"schedule", "warmup_steps", -1,
       "schedule.warmup_steps must be in [0, schedule.max_steps=100]"},
      {"schedule", "warmup_steps", 101,
       "schedule.warmup_steps must be in [0, schedule.max_steps=100]"},
      {"schedule", "min_lr_ratio", 1.5, "schedule.min_lr_ratio must be in [0, 1], got 1.5"},
      {"schedule", "type", "step", "schedule.type must be one of constant, cosine, wsd"},
      {"schedule", "decay_shape", "1-sqrt",
       "schedule.decay_shape must be one of linear, cosine, sqrt"},
      {"schedule", "decay_steps", 10,
       "schedule.decay_steps and schedule.decay_fraction apply only"},
      {"schedule", "decay_fraction", 0.1,
       "schedule.decay_steps and schedule.decay_fraction apply only"},
      {"checkpoint", "dir", "", "checkpoint.dir must be set"},
      {"checkpoint", "every_steps", -1, "checkpoint.every_steps must be >= 0"},
      {"checkpoint", "keep_last", -1, "checkpoint.keep_last must be >= 0"},
      {"checkpoint", "dir", 5, "checkpoint.dir must be a string, got 5"},
      {"data", "windows", "documents",
       "data.windows must be one of stream, packed, single, got \"documents\""},
      {"data", "windows", 1, "data.windows must be a string, got 1"},
      {"eval", "every_steps", -1, "eval.every_steps must be >= 0"},
      {"eval", "max_batches", 0, "eval.max_batches must be > 0"},
      {"log", "every_steps", 0, "log.every_steps must be > 0"},
      {"optimizer", "on_nonfinite", "ignore",
       "optimizer.on_nonfinite must be \"stop\" or \"skip\""},
      {"pma", "enabled", 1, "pma.enabled must be true or false, got 1"},
      {"parallel", "expert_parallel", 0, "parallel.expert_parallel must be in [1, 1024], got 0"},
      {"parallel", "expert_parallel", 3, "must be divisible by parallel.expert_parallel (3)"},
      {"parallel", "grad_reduce_dtype", "fp8",
       "parallel.grad_reduce_dtype must be \"fp32\" or \"bf16\", got \"fp8\""},
      {"parallel", "grad_bucket_mb", -1, "parallel.grad_bucket_mb must be in [0, 65536]"},
      {"parallel", "grad_bucket_mb", 1e6, "parallel.grad_bucket_mb must be in [0, 65536]"},
      {"parallel", "grad_bucket_mb", "64", "parallel.grad_bucket_mb must be a number"},
      {"parallel", "ep_dispatch", "all-to-all",
       "parallel.ep_dispatch must be \"allgather\", \"alltoall\" or \"auto\" for every MoE layer, "
       "or a comma-separated list of them with one per decoder layer, got \"all-to-all\""},
      {"parallel", "ep_dispatch", "alltoall,all-to-all", "got \"alltoall,all-to-all\""},
      {"parallel", "ep_dispatch", "alltoall,", "got \"alltoall,\""},
      {"parallel", "ep_comm_dtype", "fp8",
       "parallel.ep_comm_dtype must be \"fp32\" or \"bf16\", got \"fp8\""},
      {"parallel", "ep_overlap_chunks", 0,
       "parallel.ep_overlap_chunks must be in [1, 4096], got 0"},
      {"parallel", "ep_overlap_chunks", 5000, "parallel.ep_overlap_chunks must be in [1, 4096]"},
      {"parallel", "ep_overlap_chunks", 2.5, "parallel.ep_overlap_chunks must be an integer"},
      {"parallel", "layout", "megatron",
       "parallel.layout must be \"sp_ep\" (sequence + expert parallel, MegaScale-MoE) or \"tp\""},
      {"parallel", "layout", 2, "parallel.layout must be a string, got 2"},
  };
  for (const Case& c : cases) {
    json j = kMinimal;
    j[c.section][c.key] = c.value;
    const std::string message = error_of([&] { train_config_from_json(j, ""); });
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << c.section << "." << c.key << "=" << c.value.dump() << ": got \"" << message << "\"";
  }
  // The pma section is checked only when enabled.
  const std::vector<Case> pma_cases = {
      {"pma", "interval_tokens", 100, "pma.interval_tokens must be a positive multiple"},
      {"pma", "every_steps", 0, "pma.every_steps must be > 0, got 0"},
      {"pma", "count", 1, "pma.count must be >= 2, got 1"},
      {"pma", "method", "median", "pma.method must be sma, ema or wma"},
      {"pma", "alpha", 0.0, "pma.alpha must be in (0, 1], got 0"},
  };
  for (const Case& c : pma_cases) {
    json j = kMinimal;
    j["pma"] = {{"enabled", true}, {"interval_tokens", 256 * 8 * 4}, {"every_steps", 10}};
    j[c.section][c.key] = c.value;
    const std::string message = error_of([&] { train_config_from_json(j, ""); });
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << c.section << "." << c.key << "=" << c.value.dump() << ": got \"" << message << "\"";
  }
  // A list of names (one per decoder layer: counted against the model by the trainer) is valid.
  {
    json j = kMinimal;
    j["parallel"] = {{"ep_dispatch", "alltoall,allgather,auto"}};
    EXPECT_EQ(train_config_from_json(j, "").parallel.ep_dispatch, "alltoall,allgather,auto");
  }
  // Layout "tp" has one expert dispatch.
  for (const char* dispatch : {"allgather", "alltoall"}) {
    json j = kMinimal;
    j["parallel"] = {{"layout", "tp"}, {"ep_dispatch", dispatch}};
    EXPECT_NE(error_of([&] { train_config_from_json(j, ""); })
                  .find("parallel.ep_dispatch (\"" + std::string(dispatch) +
                        "\") applies only to parallel.layout \"sp_ep\""),
              std::string::npos)
        << dispatch;
  }
  json tp = kMinimal;
  tp["parallel"] = {{"layout", "tp"}, {"expert_parallel", 4}};
  EXPECT_EQ(train_config_from_json(tp, "").parallel.layout, "tp");
  json no_steps = kMinimal;
  no_steps.erase("schedule");
  EXPECT_NE(error_of([&] {
              train_config_from_json(no_steps, "");
            }).find("schedule.max_steps must be > 0"),
            std::string::npos);
}

TEST(TrainConfigTest, WsdDecayIsStepsOrFractionNotBoth) {
  json j = kMinimal;
  j["schedule"]["type"] = "wsd";
  EXPECT_EQ(wsd_decay_steps(train_config_from_json(j, "").schedule), 20);  // default fraction 0.2
  j["schedule"]["decay_fraction"] = 0.25;
  EXPECT_EQ(wsd_decay_steps(train_config_from_json(j, "").schedule), 25);
  j["schedule"]["decay_steps"] = 30;
  EXPECT_NE(error_of([&] {
              train_config_from_json(j, "");
            }).find("set at most one of schedule.decay_steps and schedule.decay_fraction"),
            std::string::npos);
  j["schedule"]["decay_fraction"] = nullptr;
  EXPECT_EQ(wsd_decay_steps(train_config_from_json(j, "").schedule), 30);

  struct Case {
    const char* key;
    json value;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"decay_steps", 0, "schedule.decay_steps must be > 0, got 0"},
      {"decay_steps", 101, "+ the decay steps (101"},
      {"warmup_steps", 80, "schedule.warmup_steps (80) + the decay steps (30"},
      {"decay_steps", "ten", "schedule.decay_steps must be an integer"},
  };
  for (const Case& c : cases) {
    json mutated = j;
    mutated["schedule"][c.key] = c.value;
    const std::string message = error_of([&] { train_config_from_json(mutated, ""); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.key << ": got " << message;
  }
  json fraction = kMinimal;
  fraction["schedule"]["type"] = "wsd";
  fraction["schedule"]["decay_fraction"] = 1.5;
  EXPECT_NE(error_of([&] {
              train_config_from_json(fraction, "");
            }).find("schedule.decay_fraction must be in (0, 1], got 1.5"),
            std::string::npos);
  fraction["schedule"]["decay_fraction"] = 0.001;  // rounds to 0 steps, kept at 1
  EXPECT_EQ(wsd_decay_steps(train_config_from_json(fraction, "").schedule), 1);
}

// Huge counts (the fuzzer's findings) are rejected with the fields named, never overflow int64_t.
TEST(TrainConfigTest, RejectsCountsWhoseArithmeticWouldOverflow) {
  constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
  json tiny_steps = kMinimal;
  tiny_steps["data"]["seq_len"] = 1;
  tiny_steps["data"]["micro_batch_size"] = 1;
  tiny_steps["schedule"]["max_steps"] = kMaxTrainSteps;
  EXPECT_EQ(train_config_from_json(tiny_steps, "").schedule.max_steps, kMaxTrainSteps);

  struct Case {
    json patch;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {{{"schedule", {{"max_steps", kInt64Max}}}},
       "schedule.max_steps must be <= 2^40 (1099511627776), got 9223372036854775807"},
      // warmup_steps + decay_steps wraps around to a negative number when added.
      {{{"schedule",
         {{"type", "wsd"},
          {"max_steps", kMaxTrainSteps},
          {"warmup_steps", kMaxTrainSteps},
          {"decay_steps", kInt64Max}}}},
       "schedule.warmup_steps (1099511627776) + the decay steps (9223372036854775807"},
      {{{"data", {{"seq_len", int64_t{1} << 20}, {"micro_batch_size", int64_t{1} << 20}}},
        {"schedule", {{"max_steps", int64_t{1} << 20}}}},
       "the run's tokens on one rank (data.seq_len 1048576 x data.micro_batch_size 1048576 x "
       "data.grad_accum_steps 1 x schedule.max_steps 1048576) must be <= 2^50"},
      // The product of the three wraps around to 0: pma.interval_tokens % 0 would crash.
      {{{"data",
         {{"seq_len", int64_t{1} << 32},
          {"micro_batch_size", int64_t{1} << 32},
          {"grad_accum_steps", 2}}},
        {"schedule", {{"max_steps", 1}}},
        {"pma", {{"enabled", true}, {"interval_tokens", 5}, {"every_steps", 1}, {"count", 2}}}},
       "the run's tokens on one rank (data.seq_len 4294967296"},
      {{{"eval", {{"max_batches", kInt64Max}}}},
       "the tokens of one evaluation (eval.max_batches 9223372036854775807 x "
       "data.micro_batch_size 1 x data.seq_len 1) must be <= 2^50"},
      {{{"pma",
         {{"enabled", true}, {"interval_tokens", 4}, {"every_steps", 1}, {"count", kInt64Max}}}},
       "the tokens one merge spans (pma.count 9223372036854775807 x pma.interval_tokens 4)"},
  };
  for (const Case& c : cases) {
    json j = tiny_steps;
    j["schedule"]["max_steps"] = 100;
    j.merge_patch(c.patch);
    const std::string message = error_of([&] { train_config_from_json(j, ""); });
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << c.patch.dump() << ": got \"" << message << "\"";
  }
}

TEST(TrainConfigTest, RoundTripsThroughJson) {
  TrainConfig c = train_config_from_json(kMinimal, "");
  EXPECT_EQ(train_config_from_json(train_config_to_json(c), ""), c);

  c.model.model_config.clear();
  c.model.init_from = "/runs/base/step-100";
  c.model.seed = 7;
  c.model.init_std = 0.01;
  c.data.seq_len = 512;
  c.data.micro_batch_size = 2;
  c.data.grad_accum_steps = 4;
  c.data.seed = 99;
  c.data.windows = "packed";
  c.optimizer = OptimizerConfig{1e-3, 0.8, 0.99, 1e-6, 0.0, {"norm"}, 0.0};
  c.schedule.type = ScheduleType::kWsd;
  c.schedule.warmup_steps = 10;
  c.schedule.decay_steps = 20;
  c.schedule.decay_shape = DecayShape::kCosine;
  c.schedule.min_lr_ratio = 0.0;
  c.checkpoint = CheckpointConfig{"/runs/x", 50, 3};
  c.eval = EvalConfig{25, 2};
  c.log = LogConfig{5, "/logs/m.jsonl"};
  c.parallel.ep_dispatch = "alltoall";
  c.parallel.grad_bucket_mb = 0.25;
  c.parallel.ep_overlap_chunks = 8;
  const json written = train_config_to_json(c);
  EXPECT_EQ(written["parallel"]["layout"], "sp_ep");
  const TrainConfig back = train_config_from_json(written, "/some/other/dir");
  EXPECT_EQ(back, c) << written.dump(2);
  EXPECT_EQ(written["schedule"]["decay_steps"], 20);
  EXPECT_TRUE(written["schedule"]["decay_fraction"].is_null());
  EXPECT_EQ(written["schedule"]["decay_shape"], "cosine");

  c.schedule.decay_steps.reset();
  c.schedule.decay_fraction = 0.3;
  c.schedule.decay_shape = DecayShape::kSqrt;
  c.schedule.type = ScheduleType::kWsd;
  EXPECT_EQ(train_config_from_json(train_config_to_json(c), ""), c);

  c.parallel.layout = "tp";
  c.parallel.ep_dispatch = "auto";
  EXPECT_EQ(train_config_from_json(train_config_to_json(c), ""), c);
}

}  // namespace
}  // namespace moeforge
