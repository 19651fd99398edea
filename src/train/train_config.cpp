// Reads the training config: merges the JSON file and the --set overrides over the defaults
// (which double as the schema of valid keys), converts to TrainConfig and validates.
#include "train/train_config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <initializer_list>
#include <numeric>

#include "core/error.h"
#include "data/windows.h"
#include "model/moe_ffn.h"

namespace moeforge {

namespace {

using nlohmann::json;

// The keys holding paths that are resolved against the config's folder.
constexpr const char* kPathKeys[] = {"model.model_config", "model.init_from", "data.dataset"};

template <typename Enum>
struct EnumName {
  Enum value;
  const char* name;
};

constexpr EnumName<ScheduleType> kScheduleTypes[] = {
    {ScheduleType::kConstant, "constant"},
    {ScheduleType::kCosine, "cosine"},
    {ScheduleType::kWsd, "wsd"},
};

constexpr EnumName<DecayShape> kDecayShapes[] = {
    {DecayShape::kLinear, "linear"},
    {DecayShape::kCosine, "cosine"},
    {DecayShape::kSqrt, "sqrt"},
};

template <typename Enum, size_t N>
const char* enum_to_string(const EnumName<Enum> (&names)[N], Enum value) {
  for (const auto& entry : names) {
    if (entry.value == value) return entry.name;
  }
  MF_FAIL("unknown enum value {}", static_cast<int>(value));
}

template <typename Enum, size_t N>
Enum enum_from_string(const EnumName<Enum> (&names)[N], const std::string& key,
                      const std::string& text) {
  std::string valid;
  for (const auto& entry : names) {
    if (text == entry.name) return entry.value;
    valid += valid.empty() ? entry.name : fmt::format(", {}", entry.name);
  }
  MF_FAIL("{} must be one of {}, got \"{}\"", key, valid, text);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), size_t{0});
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t k = 1; k <= b.size(); ++k) {
      const size_t above = row[k];
      row[k] = std::min({row[k] + 1, row[k - 1] + 1, diagonal + (a[i - 1] == b[k - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string join_path(const std::string& section, const std::string& key) {
  return section.empty() ? key : section + "." + key;
}

// The error for a key that the defaults do not have: the closest valid key and all of them.
[[noreturn]] void unknown_key(const std::string& source, const json& level,
                              const std::string& section, const std::string& key) {
  std::string valid;
  std::string closest;
  size_t closest_distance = std::max<size_t>(2, key.size() / 3) + 1;
  for (const auto& item : level.items()) {
    valid += valid.empty() ? item.key() : ", " + item.key();
    const size_t distance = edit_distance(key, item.key());
    if (distance < closest_distance) {
      closest_distance = distance;
      closest = item.key();
    }
  }
  const std::string hint =
      closest.empty() ? "" : fmt::format(" (did you mean \"{}\"?)", join_path(section, closest));
  MF_FAIL("{}: unknown key \"{}\"{}; valid keys {}: {}", source, join_path(section, key), hint,
          section.empty() ? "at the top level" : "in " + section, valid);
}

// Writes value at key (a key of level) in place: sections merge key by key, other values replace.
void merge_value(json& level, const std::string& section, const std::string& key, const json& value,
                 const std::string& source);

void merge_section(json& section_json, const std::string& section, const json& patch,
                   const std::string& source) {
  MF_CHECK(patch.is_object(), "{}: {} must be an object (a section), got {}", source,
           section.empty() ? "the config" : section,
           patch.dump(-1, ' ', false, json::error_handler_t::replace));
  for (const auto& item : patch.items())
    merge_value(section_json, section, item.key(), item.value(), source);
}

void merge_value(json& level, const std::string& section, const std::string& key, const json& value,
                 const std::string& source) {
  auto it = level.find(key);
  if (it == level.end()) unknown_key(source, level, section, key);
  if (it->is_object()) {
    merge_section(*it, join_path(section, key), value, source);
  } else {
    *it = value;
  }
}

// Applies one "key.path=value" override to the merged config.
void apply_override(json& config, const std::string& override_text) {
  const size_t eq = override_text.find('=');
  const std::string source = fmt::format("--set {}", override_text);
  MF_CHECK(eq != std::string::npos && eq > 0, "{}: expected key.path=value", source);
  const std::string key_path = override_text.substr(0, eq);
  const std::string text = override_text.substr(eq + 1);
  json value = json::parse(text, nullptr, false);
  if (value.is_discarded()) value = text;

  json* level = &config;
  std::string section;
  size_t start = 0;
  for (size_t dot = key_path.find('.'); dot != std::string::npos; dot = key_path.find('.', start)) {
    const std::string key = key_path.substr(start, dot - start);
    auto it = level->find(key);
    if (it == level->end()) unknown_key(source, *level, section, key);
    section = join_path(section, key);
    MF_CHECK(it->is_object(), "{}: {} is a value, not a section", source, section);
    level = &*it;
    start = dot + 1;
  }
  const std::string key = key_path.substr(start);
  if (value.is_string() && std::count(std::begin(kPathKeys), std::end(kPathKeys), key_path) > 0) {
    const std::filesystem::path path = value.get<std::string>();
    if (!path.empty()) value = std::filesystem::absolute(path).lexically_normal().string();
  }
  merge_value(*level, section, key, value, source);
}

// Typed access to one section of the merged config; errors name the key path.
class SectionReader {
 public:
  SectionReader(const json& config, const char* section)
      : j_(config.at(section)), section_(section) {}

  int64_t get_int(const char* key) const {
    const json& v = at(key);
    if (!v.is_number_integer()) type_error(key, "an integer", v);
    return v.get<int64_t>();
  }
  uint64_t get_seed(const char* key) const {
    const json& v = at(key);
    // JSON parsed from text stores non-negative integers as unsigned, JSON built in code as signed.
    const bool non_negative =
        v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
    if (!non_negative) type_error(key, "a non-negative integer", v);
    return v.get<uint64_t>();
  }
  double get_number(const char* key) const {
    const json& v = at(key);
    if (!v.is_number()) type_error(key, "a number", v);
    return v.get<double>();
  }
  std::string get_string(const char* key) const {
    const json& v = at(key);
    if (!v.is_string()) type_error(key, "a string", v);
    return v.get<std::string>();
  }
  bool get_bool(const char* key) const {
    const json& v = at(key);
    if (!v.is_boolean()) type_error(key, "true or false", v);
    return v.get<bool>();
  }
  std::vector<std::string> get_strings(const char* key) const {
    const json& v = at(key);
    if (!v.is_array() ||
        !std::all_of(v.begin(), v.end(), [](const json& s) { return s.is_string(); })) {
      type_error(key, "a list of strings", v);
    }
    return v.get<std::vector<std::string>>();
  }
  std::optional<int64_t> get_optional_int(const char* key) const {
    if (at(key).is_null()) return std::nullopt;
    return get_int(key);
  }
  std::optional<double> get_optional_number(const char* key) const {
    if (at(key).is_null()) return std::nullopt;
    return get_number(key);
  }
  std::string key_path(const char* key) const { return join_path(section_, key); }

 private:
  const json& at(const char* key) const { return j_.at(key); }
  [[noreturn]] void type_error(const char* key, const char* expected, const json& v) const {
    MF_FAIL("{} must be {}, got {}", key_path(key), expected,
            v.dump(-1, ' ', false, json::error_handler_t::replace));
  }

  const json& j_;
  std::string section_;
};

std::filesystem::path resolve(const std::filesystem::path& path,
                              const std::filesystem::path& base_dir) {
  if (path.empty() || path.is_absolute() || base_dir.empty()) return path;
  return (base_dir / path).lexically_normal();
}

// Converts the merged config (every key present) to TrainConfig and validates it.
TrainConfig parse_merged(const json& merged, const std::filesystem::path& base_dir) {
  TrainConfig c;
  const SectionReader model(merged, "model");
  c.model.model_config = resolve(model.get_string("model_config"), base_dir);
  c.model.init_from = resolve(model.get_string("init_from"), base_dir);
  c.model.seed = model.get_seed("seed");
  c.model.init_std = model.get_number("init_std");

  const SectionReader data(merged, "data");
  c.data.dataset = resolve(data.get_string("dataset"), base_dir);
  c.data.seq_len = data.get_int("seq_len");
  c.data.micro_batch_size = data.get_int("micro_batch_size");
  c.data.grad_accum_steps = data.get_int("grad_accum_steps");
  c.data.seed = data.get_seed("seed");
  c.data.windows = data.get_string("windows");

  const SectionReader opt(merged, "optimizer");
  c.optimizer.lr = opt.get_number("lr");
  c.optimizer.beta1 = opt.get_number("beta1");
  c.optimizer.beta2 = opt.get_number("beta2");
  c.optimizer.eps = opt.get_number("eps");
  c.optimizer.weight_decay = opt.get_number("weight_decay");
  c.optimizer.no_decay = opt.get_strings("no_decay");
  c.optimizer.grad_clip = opt.get_number("grad_clip");
  c.optimizer.on_nonfinite = opt.get_string("on_nonfinite");

  const SectionReader sched(merged, "schedule");
  c.schedule.type =
      enum_from_string(kScheduleTypes, sched.key_path("type"), sched.get_string("type"));
  c.schedule.warmup_steps = sched.get_int("warmup_steps");
  c.schedule.max_steps = sched.get_int("max_steps");
  c.schedule.min_lr_ratio = sched.get_number("min_lr_ratio");
  c.schedule.decay_steps = sched.get_optional_int("decay_steps");
  c.schedule.decay_fraction = sched.get_optional_number("decay_fraction");
  c.schedule.decay_shape = enum_from_string(kDecayShapes, sched.key_path("decay_shape"),
                                            sched.get_string("decay_shape"));

  const SectionReader ckpt(merged, "checkpoint");
  c.checkpoint.dir = ckpt.get_string("dir");
  c.checkpoint.every_steps = ckpt.get_int("every_steps");
  c.checkpoint.keep_last = ckpt.get_int("keep_last");

  const SectionReader eval(merged, "eval");
  c.eval.every_steps = eval.get_int("every_steps");
  c.eval.max_batches = eval.get_int("max_batches");

  const SectionReader log(merged, "log");
  c.log.every_steps = log.get_int("every_steps");
  c.log.metrics_file = log.get_string("metrics_file");
  if (c.log.metrics_file.empty()) c.log.metrics_file = c.checkpoint.dir / "metrics.jsonl";

  const SectionReader pma(merged, "pma");
  c.pma.enabled = pma.get_bool("enabled");
  c.pma.interval_tokens = pma.get_int("interval_tokens");
  c.pma.every_steps = pma.get_int("every_steps");
  c.pma.count = pma.get_int("count");
  c.pma.method = pma.get_string("method");
  c.pma.alpha = pma.get_number("alpha");

  const SectionReader parallel(merged, "parallel");
  c.parallel.expert_parallel = parallel.get_int("expert_parallel");
  c.parallel.layout = parallel.get_string("layout");
  c.parallel.grad_reduce_dtype = parallel.get_string("grad_reduce_dtype");
  c.parallel.grad_bucket_mb = parallel.get_number("grad_bucket_mb");
  c.parallel.ep_dispatch = parallel.get_string("ep_dispatch");
  c.parallel.ep_comm_dtype = parallel.get_string("ep_comm_dtype");
  c.parallel.ep_overlap_chunks = parallel.get_int("ep_overlap_chunks");
  c.parallel.zero_stage = parallel.get_int("zero_stage");

  validate_train_config(c);
  return c;
}

// The product of positive factors, or nullopt when it exceeds limit (or int64_t).
std::optional<int64_t> bounded_product(std::initializer_list<int64_t> factors, int64_t limit) {
  int64_t product = 1;
  for (const int64_t factor : factors) {
    if (__builtin_mul_overflow(product, factor, &product) || product > limit) return std::nullopt;
  }
  return product;
}

}  // namespace

int64_t wsd_decay_steps(const ScheduleConfig& s) {
  if (s.decay_steps) return *s.decay_steps;
  const double fraction = s.decay_fraction.value_or(0.2);
  return std::max<int64_t>(1, std::llround(fraction * static_cast<double>(s.max_steps)));
}

nlohmann::json train_config_to_json(const TrainConfig& c) {
  const ScheduleConfig& s = c.schedule;
  return json{
      {"model",
       {{"model_config", c.model.model_config.string()},
        {"init_from", c.model.init_from.string()},
        {"seed", c.model.seed},
        {"init_std", c.model.init_std}}},
      {"data",
       {{"dataset", c.data.dataset.string()},
        {"seq_len", c.data.seq_len},
        {"micro_batch_size", c.data.micro_batch_size},
        {"grad_accum_steps", c.data.grad_accum_steps},
        {"seed", c.data.seed},
        {"windows", c.data.windows}}},
      {"optimizer",
       {{"lr", c.optimizer.lr},
        {"beta1", c.optimizer.beta1},
        {"beta2", c.optimizer.beta2},
        {"eps", c.optimizer.eps},
        {"weight_decay", c.optimizer.weight_decay},
        {"no_decay", c.optimizer.no_decay},
        {"grad_clip", c.optimizer.grad_clip},
        {"on_nonfinite", c.optimizer.on_nonfinite}}},
      {"schedule",
       {{"type", enum_to_string(kScheduleTypes, s.type)},
        {"warmup_steps", s.warmup_steps},
        {"max_steps", s.max_steps},
        {"min_lr_ratio", s.min_lr_ratio},
        {"decay_steps", s.decay_steps ? json(*s.decay_steps) : json(nullptr)},
        {"decay_fraction", s.decay_fraction ? json(*s.decay_fraction) : json(nullptr)},
        {"decay_shape", enum_to_string(kDecayShapes, s.decay_shape)}}},
      {"checkpoint",
       {{"dir", c.checkpoint.dir.string()},
        {"every_steps", c.checkpoint.every_steps},
        {"keep_last", c.checkpoint.keep_last}}},
      {"eval", {{"every_steps", c.eval.every_steps}, {"max_batches", c.eval.max_batches}}},
      {"log", {{"every_steps", c.log.every_steps}, {"metrics_file", c.log.metrics_file.string()}}},
      {"pma",
       {{"enabled", c.pma.enabled},
        {"interval_tokens", c.pma.interval_tokens},
        {"every_steps", c.pma.every_steps},
        {"count", c.pma.count},
        {"method", c.pma.method},
        {"alpha", c.pma.alpha}}},
      {"parallel",
       {{"expert_parallel", c.parallel.expert_parallel},
        {"layout", c.parallel.layout},
        {"grad_reduce_dtype", c.parallel.grad_reduce_dtype},
        {"grad_bucket_mb", c.parallel.grad_bucket_mb},
        {"ep_dispatch", c.parallel.ep_dispatch},
        {"ep_comm_dtype", c.parallel.ep_comm_dtype},
        {"ep_overlap_chunks", c.parallel.ep_overlap_chunks},
        {"zero_stage", c.parallel.zero_stage}}},
  };
}

void validate_train_config(const TrainConfig& c) {
  MF_CHECK(c.model.model_config.empty() != c.model.init_from.empty(),
           "set exactly one of model.model_config and model.init_from (got model_config=\"{}\", "
           "init_from=\"{}\")",
           c.model.model_config.string(), c.model.init_from.string());
  MF_CHECK(c.model.init_std > 0, "model.init_std must be > 0, got {}", c.model.init_std);

  MF_CHECK(!c.data.dataset.empty(),
           "data.dataset must be set (a dir from `moeforge data prepare`)");
  MF_CHECK(c.data.seq_len > 0, "data.seq_len must be > 0, got {}", c.data.seq_len);
  MF_CHECK(c.data.micro_batch_size > 0, "data.micro_batch_size must be > 0, got {}",
           c.data.micro_batch_size);
  MF_CHECK(c.data.grad_accum_steps > 0, "data.grad_accum_steps must be > 0, got {}",
           c.data.grad_accum_steps);
  data::parse_window_layout(c.data.windows, "data.windows");

  const OptimizerConfig& o = c.optimizer;
  MF_CHECK(o.lr > 0, "optimizer.lr must be > 0, got {}", o.lr);
  MF_CHECK(o.beta1 >= 0 && o.beta1 < 1, "optimizer.beta1 must be in [0, 1), got {}", o.beta1);
  MF_CHECK(o.beta2 >= 0 && o.beta2 < 1, "optimizer.beta2 must be in [0, 1), got {}", o.beta2);
  MF_CHECK(o.eps > 0, "optimizer.eps must be > 0, got {}", o.eps);
  MF_CHECK(o.weight_decay >= 0, "optimizer.weight_decay must be >= 0, got {}", o.weight_decay);
  for (const std::string& pattern : o.no_decay) {
    MF_CHECK(!pattern.empty(), "optimizer.no_decay entries must be non-empty substrings");
  }
  MF_CHECK(o.grad_clip >= 0, "optimizer.grad_clip must be >= 0 (0: off), got {}", o.grad_clip);

  const ScheduleConfig& s = c.schedule;
  MF_CHECK(s.max_steps > 0, "schedule.max_steps must be > 0, got {}", s.max_steps);
  MF_CHECK(s.max_steps <= kMaxTrainSteps, "schedule.max_steps must be <= 2^40 ({}), got {}",
           kMaxTrainSteps, s.max_steps);
  const std::optional<int64_t> run_tokens = bounded_product(
      {c.data.seq_len, c.data.micro_batch_size, c.data.grad_accum_steps, s.max_steps},
      kMaxTrainTokens);
  MF_CHECK(run_tokens.has_value(),
           "the run's tokens on one rank (data.seq_len {} x data.micro_batch_size {} x "
           "data.grad_accum_steps {} x schedule.max_steps {}) must be <= 2^50 ({})",
           c.data.seq_len, c.data.micro_batch_size, c.data.grad_accum_steps, s.max_steps,
           kMaxTrainTokens);
  MF_CHECK(s.warmup_steps >= 0 && s.warmup_steps <= s.max_steps,
           "schedule.warmup_steps must be in [0, schedule.max_steps={}], got {}", s.max_steps,
           s.warmup_steps);
  MF_CHECK(s.min_lr_ratio >= 0 && s.min_lr_ratio <= 1,
           "schedule.min_lr_ratio must be in [0, 1], got {}", s.min_lr_ratio);
  if (s.type != ScheduleType::kWsd) {
    MF_CHECK(!s.decay_steps && !s.decay_fraction,
             "schedule.decay_steps and schedule.decay_fraction apply only to schedule.type "
             "\"wsd\", got type \"{}\"",
             enum_to_string(kScheduleTypes, s.type));
  } else {
    MF_CHECK(!(s.decay_steps && s.decay_fraction),
             "set at most one of schedule.decay_steps and schedule.decay_fraction");
    MF_CHECK(!s.decay_steps || *s.decay_steps > 0, "schedule.decay_steps must be > 0, got {}",
             s.decay_steps.value_or(0));
    MF_CHECK(!s.decay_fraction || (*s.decay_fraction > 0 && *s.decay_fraction <= 1),
             "schedule.decay_fraction must be in (0, 1], got {}", s.decay_fraction.value_or(0));
    // Written as a difference: warmup_steps is in [0, max_steps], so nothing overflows.
    MF_CHECK(wsd_decay_steps(s) <= s.max_steps - s.warmup_steps,
             "schedule.warmup_steps ({}) + the decay steps ({}, from schedule.decay_steps or "
             "schedule.decay_fraction) must be <= schedule.max_steps ({})",
             s.warmup_steps, wsd_decay_steps(s), s.max_steps);
  }

  MF_CHECK(!c.checkpoint.dir.empty(), "checkpoint.dir must be set");
  MF_CHECK(c.checkpoint.every_steps >= 0,
           "checkpoint.every_steps must be >= 0 (0: only at the end), got {}",
           c.checkpoint.every_steps);
  MF_CHECK(c.checkpoint.keep_last >= 0, "checkpoint.keep_last must be >= 0 (0: keep all), got {}",
           c.checkpoint.keep_last);

  MF_CHECK(c.eval.every_steps >= 0, "eval.every_steps must be >= 0 (0: only at the end), got {}",
           c.eval.every_steps);
  MF_CHECK(c.eval.max_batches > 0, "eval.max_batches must be > 0, got {}", c.eval.max_batches);
  MF_CHECK(bounded_product({c.eval.max_batches, c.data.micro_batch_size, c.data.seq_len},
                           kMaxTrainTokens)
               .has_value(),
           "the tokens of one evaluation (eval.max_batches {} x data.micro_batch_size {} x "
           "data.seq_len {}) must be <= 2^50 ({})",
           c.eval.max_batches, c.data.micro_batch_size, c.data.seq_len, kMaxTrainTokens);

  MF_CHECK(c.log.every_steps > 0, "log.every_steps must be > 0, got {}", c.log.every_steps);
  MF_CHECK(c.optimizer.on_nonfinite == "stop" || c.optimizer.on_nonfinite == "skip",
           "optimizer.on_nonfinite must be \"stop\" or \"skip\", got \"{}\"",
           c.optimizer.on_nonfinite);
  MF_CHECK(c.parallel.expert_parallel >= 1 && c.parallel.expert_parallel <= 1024,
           "parallel.expert_parallel must be in [1, 1024], got {}", c.parallel.expert_parallel);
  MF_CHECK(c.parallel.grad_reduce_dtype == "fp32" || c.parallel.grad_reduce_dtype == "bf16",
           "parallel.grad_reduce_dtype must be \"fp32\" or \"bf16\", got \"{}\"",
           c.parallel.grad_reduce_dtype);
  MF_CHECK(c.parallel.ep_comm_dtype == "fp32" || c.parallel.ep_comm_dtype == "bf16",
           "parallel.ep_comm_dtype must be \"fp32\" or \"bf16\", got \"{}\"",
           c.parallel.ep_comm_dtype);
  MF_CHECK(c.parallel.ep_overlap_chunks >= 1 && c.parallel.ep_overlap_chunks <= 4096,
           "parallel.ep_overlap_chunks must be in [1, 4096], got {}", c.parallel.ep_overlap_chunks);
  MF_CHECK(c.parallel.grad_bucket_mb >= 0.0 && c.parallel.grad_bucket_mb <= 65536.0,
           "parallel.grad_bucket_mb must be in [0, 65536] (MiB; 0: one sum after the backward), "
           "got {}",
           c.parallel.grad_bucket_mb);
  // Each comma-separated entry a name; their count against the model's layers is the trainer's.
  bool dispatch_names_ok = true;
  try {
    parse_ep_dispatch_list(c.parallel.ep_dispatch);
  } catch (const Error&) {
    dispatch_names_ok = false;
  }
  MF_CHECK(dispatch_names_ok,
           "parallel.ep_dispatch must be \"allgather\", \"alltoall\" or \"auto\" for every MoE "
           "layer, or a comma-separated list of them with one per decoder layer, got \"{}\"",
           c.parallel.ep_dispatch);
  MF_CHECK(c.parallel.layout == "sp_ep" || c.parallel.layout == "tp",
           "parallel.layout must be \"sp_ep\" (sequence + expert parallel, MegaScale-MoE) or "
           "\"tp\" (tensor parallel, the Megatron-LM baseline), got \"{}\"",
           c.parallel.layout);
  MF_CHECK(c.parallel.layout != "tp" || c.parallel.ep_dispatch == "auto",
           "parallel.ep_dispatch (\"{}\") applies only to parallel.layout \"sp_ep\": layout "
           "\"tp\" runs every expert on every rank (leave ep_dispatch \"auto\")",
           c.parallel.ep_dispatch);
  MF_CHECK(c.parallel.zero_stage == 0 || c.parallel.zero_stage == 1,
           "parallel.zero_stage must be 0 (every rank holds the whole optimizer state) or 1 "
           "(AdamW's state sharded over the data-parallel ranks), got {}",
           c.parallel.zero_stage);
  MF_CHECK(c.data.seq_len % c.parallel.expert_parallel == 0,
           "data.seq_len ({}) must be divisible by parallel.expert_parallel ({}): each rank of a "
           "group holds an equal slice of every sequence",
           c.data.seq_len, c.parallel.expert_parallel);
  if (c.pma.enabled) {
    // No overflow: at most the run's tokens, checked above.
    const int64_t step_tokens = c.data.seq_len * c.data.micro_batch_size * c.data.grad_accum_steps;
    MF_CHECK(
        c.pma.interval_tokens > 0 && c.pma.interval_tokens % step_tokens == 0,
        "pma.interval_tokens must be a positive multiple of the tokens of one step on one rank "
        "(seq_len x micro_batch_size x grad_accum_steps = {}), got {}",
        step_tokens, c.pma.interval_tokens);
    MF_CHECK(c.pma.every_steps > 0, "pma.every_steps must be > 0, got {}", c.pma.every_steps);
    MF_CHECK(c.pma.count >= 2, "pma.count must be >= 2, got {}", c.pma.count);
    MF_CHECK(bounded_product({c.pma.count, c.pma.interval_tokens}, kMaxTrainTokens).has_value(),
             "the tokens one merge spans (pma.count {} x pma.interval_tokens {}) must be <= 2^50 "
             "({})",
             c.pma.count, c.pma.interval_tokens, kMaxTrainTokens);
    MF_CHECK(c.pma.method == "sma" || c.pma.method == "ema" || c.pma.method == "wma",
             "pma.method must be sma, ema or wma, got \"{}\"", c.pma.method);
    MF_CHECK(c.pma.alpha > 0.0 && c.pma.alpha <= 1.0, "pma.alpha must be in (0, 1], got {}",
             c.pma.alpha);
  }
  MF_CHECK(!c.log.metrics_file.empty(), "log.metrics_file must be set");
}

TrainConfig train_config_from_json(const nlohmann::json& j, const std::filesystem::path& base_dir) {
  json merged = train_config_to_json(TrainConfig{});
  merge_section(merged, "", j, "train config");
  return parse_merged(merged, base_dir);
}

TrainConfig load_train_config(const std::filesystem::path& path,
                              const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  MF_CHECK(in.good(), "cannot open training config {}", path.string());
  json file_json;
  try {
    file_json = json::parse(in);
  } catch (const json::exception& e) {
    MF_FAIL("{}: invalid JSON: {}", path.string(), e.what());
  }
  json merged = train_config_to_json(TrainConfig{});
  merge_section(merged, "", file_json, path.string());
  for (const std::string& override_text : overrides) apply_override(merged, override_text);
  return parse_merged(merged, std::filesystem::absolute(path).parent_path());
}

}  // namespace moeforge
