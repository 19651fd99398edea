// The RULER-style task generators, scoring rule and task files of synth_tasks.h.
#include "data/synth_tasks.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

#include "core/error.h"
#include "core/rng.h"
#include "data/file_util.h"
#include "io/atomic_file.h"

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

inline constexpr int64_t kSynthJsonlFormatVersion = 1;

// Filler and key words: lower case letters only, so that filler never holds a digit, a '-' or
// "VAR", and needles are found by their exact text.
constexpr std::array<std::string_view, 32> kAdjectives = {
    "quiet", "green", "small", "bright", "cold",   "warm",  "old",    "young",
    "tall",  "soft",  "loud",  "gentle", "brave",  "calm",  "dark",   "early",
    "fast",  "happy", "heavy", "kind",   "late",   "light", "lucky",  "noisy",
    "plain", "proud", "quick", "rough",  "silent", "sunny", "wooden", "yellow"};
constexpr std::array<std::string_view, 32> kNouns = {
    "river",    "garden",  "window", "forest", "bridge", "candle", "castle", "cloud",
    "field",    "harbor",  "island", "kettle", "ladder", "lamp",   "meadow", "mirror",
    "mountain", "orchard", "pebble", "pillow", "planet", "rabbit", "road",   "sail",
    "shadow",   "stone",   "street", "table",  "tower",  "valley", "wagon",  "fox"};
constexpr std::array<std::string_view, 8> kVerbs = {"waits", "rests", "sings", "sleeps",
                                                    "walks", "hides", "stays", "turns"};

constexpr std::string_view kNiahHeader =
    "Some special magic numbers are hidden in the following text. Remember them; I will ask "
    "about them afterwards.\n";
constexpr std::string_view kVtHeader =
    "Remember the variable assignments hidden in the following text; I will ask about them "
    "afterwards.\n";
constexpr int64_t kNiahValueDigits = 7;
constexpr int64_t kVtValueDigits = 5;
constexpr int64_t kVtNameLetters = 5;

template <size_t N>
size_t longest(const std::array<std::string_view, N>& words) {
  size_t max_size = 0;
  for (std::string_view word : words) max_size = std::max(max_size, word.size());
  return max_size;
}

template <size_t N>
std::string_view pick(const std::array<std::string_view, N>& words, Rng& rng) {
  return words[rng.below(N)];
}

std::string niah_needle(std::string_view key, std::string_view value) {
  return fmt::format("The special magic number for {} is {}.", key, value);
}

std::string vt_needle(std::string_view name, std::string_view value) {
  return fmt::format("VAR {} = {}.", name, value);
}

std::string question(SynthTask task, std::string_view key_or_value) {
  switch (task) {
    case SynthTask::kNiahSingle:
    case SynthTask::kNiahMultikey:
      return fmt::format("\nWhat is the special magic number for {}? Answer: ", key_or_value);
    case SynthTask::kNiahMultivalue:
      return fmt::format("\nWhat are all the special magic numbers for {}? Answer: ", key_or_value);
    case SynthTask::kVariableTracking:
      return fmt::format("\nWhich variables are assigned the value {}? Answer: ", key_or_value);
  }
  MF_FAIL("unknown synthetic task {}", static_cast<int>(task));
}

int64_t num_needles(SynthTask task, int64_t vt_variables) {
  switch (task) {
    case SynthTask::kNiahSingle: return 1;
    case SynthTask::kNiahMultikey: return kNumMultikeyNeedles;
    case SynthTask::kNiahMultivalue: return kNumMultivalueNeedles;
    case SynthTask::kVariableTracking: return kNumVtChains * vt_variables;
  }
  MF_FAIL("unknown synthetic task {}", static_cast<int>(task));
}

// A fixed-width decimal number with a non-zero first digit.
std::string random_number(Rng& rng, int64_t num_digits) {
  uint64_t low = 1;
  for (int64_t digit_idx = 1; digit_idx < num_digits; ++digit_idx) low *= 10;
  return std::to_string(low + rng.below(9 * low));
}

// `count` distinct strings from make(rng), by rejection.
template <typename Make>
std::vector<std::string> distinct(Rng& rng, int64_t count, Make make) {
  std::vector<std::string> out;
  while (static_cast<int64_t>(out.size()) < count) {
    std::string candidate = make(rng);
    if (std::find(out.begin(), out.end(), candidate) == out.end()) out.push_back(candidate);
  }
  return out;
}

std::string random_key(Rng& rng) {
  std::string_view adjective = pick(kAdjectives, rng);
  return fmt::format("{}-{}", adjective, pick(kNouns, rng));
}

std::string random_name(Rng& rng) {
  std::string name(kVtNameLetters, 'A');
  for (char& letter : name) letter = static_cast<char>('A' + rng.below(26));
  return name;
}

std::string filler_sentence(Rng& rng) {
  if (rng.below(2) == 0) {
    std::string_view noun = pick(kNouns, rng);
    return fmt::format("The {} is {}.", noun, pick(kAdjectives, rng));
  }
  std::string_view adjective = pick(kAdjectives, rng);
  std::string_view noun = pick(kNouns, rng);
  std::string_view verb = pick(kVerbs, rng);
  return fmt::format("A {} {} {} by the {}.", adjective, noun, verb, pick(kNouns, rng));
}

// Filler text of exactly num_bytes bytes: sentences each followed by a space, the last one cut.
// sentence_starts gets the offsets where a needle may go (sentence starts, and num_bytes when the
// cut falls on a sentence end).
std::string make_filler(Rng& rng, int64_t num_bytes, std::vector<int64_t>& sentence_starts) {
  std::string filler;
  sentence_starts.assign(1, 0);
  while (static_cast<int64_t>(filler.size()) < num_bytes) {
    if (!filler.empty()) sentence_starts.push_back(static_cast<int64_t>(filler.size()));
    filler += filler_sentence(rng);
    filler += ' ';
  }
  if (static_cast<int64_t>(filler.size()) == num_bytes && num_bytes > 0) {
    sentence_starts.push_back(num_bytes);
  }
  filler.resize(static_cast<size_t>(num_bytes));
  return filler;
}

// A needle to insert before filler offset sentence_starts[start_idx]; needles at the same offset
// go in increasing `order`.
struct Placement {
  int64_t start_idx = 0;
  int64_t order = 0;
  std::string text;
  bool anchor = false;
};

size_t nearest_start(const std::vector<int64_t>& sentence_starts, double target) {
  size_t best_idx = 0;
  for (size_t start_idx = 1; start_idx < sentence_starts.size(); ++start_idx) {
    if (std::abs(static_cast<double>(sentence_starts[start_idx]) - target) <
        std::abs(static_cast<double>(sentence_starts[best_idx]) - target)) {
      best_idx = start_idx;
    }
  }
  return best_idx;
}

// Indices in [first, num_starts), sorted: where the later needles of a chain go.
std::vector<int64_t> sorted_starts_from(Rng& rng, int64_t first, int64_t num_starts,
                                        int64_t count) {
  std::vector<int64_t> out(static_cast<size_t>(count));
  for (int64_t& start_idx : out) {
    start_idx = first + static_cast<int64_t>(rng.below(static_cast<uint64_t>(num_starts - first)));
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> split_answer_items(std::string_view text) {
  std::vector<std::string> items;
  std::string item;
  for (char c : text) {
    if (c == ',' || c == ' ' || c == '\t' || c == '\r') {
      if (!item.empty()) items.push_back(std::move(item));
      item.clear();
    } else {
      item += c;
    }
  }
  if (!item.empty()) items.push_back(std::move(item));
  return items;
}

std::string_view trim_spaces(std::string_view text) {
  const size_t begin = text.find_first_not_of(" \t\r");
  if (begin == std::string_view::npos) return {};
  const size_t end = text.find_last_not_of(" \t\r");
  return text.substr(begin, end - begin + 1);
}

}  // namespace

std::string synth_task_name(SynthTask task) {
  switch (task) {
    case SynthTask::kNiahSingle: return "niah_single";
    case SynthTask::kNiahMultikey: return "niah_multikey";
    case SynthTask::kNiahMultivalue: return "niah_multivalue";
    case SynthTask::kVariableTracking: return "vt";
  }
  MF_FAIL("unknown synthetic task {}", static_cast<int>(task));
}

std::vector<SynthTask> all_synth_tasks() {
  return {SynthTask::kNiahSingle, SynthTask::kNiahMultikey, SynthTask::kNiahMultivalue,
          SynthTask::kVariableTracking};
}

SynthTask parse_synth_task(std::string_view name, std::string_view where) {
  std::vector<std::string> names;
  for (SynthTask task : all_synth_tasks()) {
    if (synth_task_name(task) == name) return task;
    names.push_back(synth_task_name(task));
  }
  MF_FAIL("{}: unknown synthetic task '{}'; the tasks are {}", where, name, fmt::join(names, ", "));
}

void check_vt_variables(int64_t vt_variables) {
  MF_CHECK(vt_variables >= 1 && vt_variables <= kMaxVtVariables,
           "synthetic task vt: the variables per chain must be in [1, {}], got {}", kMaxVtVariables,
           vt_variables);
}

int64_t synth_min_length(SynthTask task, int64_t vt_variables) {
  check_vt_variables(vt_variables);
  if (task == SynthTask::kVariableTracking) {
    const std::string name(kVtNameLetters, 'A');
    const std::string value(kVtValueDigits, '1');
    return static_cast<int64_t>(kVtHeader.size() + question(task, value).size()) +
           num_needles(task, vt_variables) *
               static_cast<int64_t>(vt_needle(name, value).size() + 1);
  }
  const std::string key(longest(kAdjectives) + 1 + longest(kNouns), 'x');
  const std::string value(kNiahValueDigits, '1');
  return static_cast<int64_t>(kNiahHeader.size() + question(task, key).size()) +
         num_needles(task, vt_variables) * static_cast<int64_t>(niah_needle(key, value).size() + 1);
}

SynthExample make_synth_example(SynthTask task, int64_t length, double depth, uint64_t seed,
                                int64_t vt_variables) {
  const std::string name = synth_task_name(task);
  const int64_t min_length = synth_min_length(task, vt_variables);
  MF_CHECK(length >= min_length,
           "synthetic task {}: length {} is below its minimum of {} tokens (header, question and "
           "{} needles)",
           name, length, min_length, num_needles(task, vt_variables));
  MF_CHECK(depth >= 0.0 && depth <= 1.0, "synthetic task {}: depth must be in [0, 1], got {}", name,
           depth);
  Rng rng(seed);
  SynthExample example;
  example.task = task;
  example.length = length;

  // Needle texts; the anchor is placements[0].
  std::vector<Placement> placements;
  std::string header, asked;
  if (task == SynthTask::kVariableTracking) {
    header = kVtHeader;
    const std::vector<std::string> values =
        distinct(rng, kNumVtChains, [](Rng& r) { return random_number(r, kVtValueDigits); });
    const std::vector<std::string> names = distinct(rng, kNumVtChains * vt_variables, random_name);
    for (int64_t chain_idx = 0; chain_idx < kNumVtChains; ++chain_idx) {
      for (int64_t var_idx = 0; var_idx < vt_variables; ++var_idx) {
        const std::string& var = names[chain_idx * vt_variables + var_idx];
        const std::string& source =
            var_idx == 0 ? values[chain_idx] : names[chain_idx * vt_variables + var_idx - 1];
        placements.push_back({0, chain_idx * vt_variables + var_idx, vt_needle(var, source),
                              chain_idx == 0 && var_idx == 0});
      }
    }
    asked = values[0];
    for (int64_t chain_idx = 0; chain_idx < kNumVtChains; ++chain_idx) {
      const auto first = names.begin() + chain_idx * vt_variables;
      const std::string chain =
          fmt::format("{}", fmt::join(std::vector<std::string>(first, first + vt_variables), ", "));
      if (chain_idx == 0) {
        example.answer = chain;
      } else {
        example.other_questions.push_back({question(task, values[chain_idx]), chain});
      }
    }
  } else {
    header = kNiahHeader;
    const int64_t num_keys = task == SynthTask::kNiahMultikey ? kNumMultikeyNeedles : 1;
    const std::vector<std::string> keys = distinct(rng, num_keys, random_key);
    const int64_t niah_needles = num_needles(task, vt_variables);
    const std::vector<std::string> values =
        distinct(rng, niah_needles, [](Rng& r) { return random_number(r, kNiahValueDigits); });
    for (int64_t needle_idx = 0; needle_idx < niah_needles; ++needle_idx) {
      const std::string& key = keys[std::min<int64_t>(needle_idx, num_keys - 1)];
      placements.push_back({0, needle_idx, niah_needle(key, values[needle_idx]), needle_idx == 0});
    }
    asked = keys[0];
    example.answer = values[0];  // multivalue: replaced by the values in text order below
    for (int64_t key_idx = 1; key_idx < num_keys; ++key_idx) {
      example.other_questions.push_back({question(task, keys[key_idx]), values[key_idx]});
    }
  }
  const std::string tail = question(task, asked);
  int64_t needle_bytes = 0;
  for (const Placement& placement : placements) {
    needle_bytes += static_cast<int64_t>(placement.text.size()) + 1;
  }
  const int64_t context_bytes =
      length - static_cast<int64_t>(header.size()) - static_cast<int64_t>(tail.size());
  const int64_t filler_bytes = context_bytes - needle_bytes;  // >= 0 by synth_min_length

  std::vector<int64_t> sentence_starts;
  const std::string filler = make_filler(rng, filler_bytes, sentence_starts);
  const auto num_starts = static_cast<int64_t>(sentence_starts.size());
  const auto anchor_idx = static_cast<int64_t>(
      nearest_start(sentence_starts, depth * static_cast<double>(filler_bytes)));
  placements[0].start_idx = anchor_idx;
  if (task == SynthTask::kVariableTracking) {
    for (int64_t chain_idx = 0; chain_idx < kNumVtChains; ++chain_idx) {
      const int64_t first =
          chain_idx == 0 ? anchor_idx : static_cast<int64_t>(rng.below(num_starts));
      const std::vector<int64_t> later =
          sorted_starts_from(rng, first, num_starts, vt_variables - 1);
      placements[chain_idx * vt_variables].start_idx = first;
      for (int64_t var_idx = 1; var_idx < vt_variables; ++var_idx) {
        placements[chain_idx * vt_variables + var_idx].start_idx = later[var_idx - 1];
      }
    }
  } else {
    for (size_t needle_idx = 1; needle_idx < placements.size(); ++needle_idx) {
      placements[needle_idx].start_idx = static_cast<int64_t>(rng.below(num_starts));
    }
  }
  std::stable_sort(
      placements.begin(), placements.end(), [](const Placement& a, const Placement& b) {
        return a.start_idx != b.start_idx ? a.start_idx < b.start_idx : a.order < b.order;
      });

  std::string& prompt = example.prompt;
  prompt.reserve(static_cast<size_t>(length));
  prompt = header;
  example.context_begin = static_cast<int64_t>(prompt.size());
  example.context_bytes = context_bytes;
  std::vector<std::string> values_in_order;
  int64_t filler_pos = 0;
  for (const Placement& placement : placements) {
    const int64_t start = sentence_starts[placement.start_idx];
    prompt.append(filler, filler_pos, start - filler_pos);
    filler_pos = start;
    if (placement.anchor) example.needle_offset = static_cast<int64_t>(prompt.size());
    prompt += placement.text;
    prompt += ' ';
    if (task == SynthTask::kNiahMultivalue) {
      const size_t value_begin = placement.text.rfind(' ') + 1;
      values_in_order.push_back(
          placement.text.substr(value_begin, placement.text.size() - value_begin - 1));
    }
  }
  prompt.append(filler, filler_pos, std::string::npos);
  prompt += tail;
  MF_CHECK(static_cast<int64_t>(prompt.size()) == length,
           "synthetic task {}: built {} bytes for length {}", name, prompt.size(), length);
  if (task == SynthTask::kNiahMultivalue) {
    example.answer = fmt::format("{}", fmt::join(values_in_order, ", "));
  }
  example.depth = static_cast<double>(example.needle_offset - example.context_begin) /
                  static_cast<double>(context_bytes);
  return example;
}

std::vector<SynthExample> make_synth_examples(std::span<const SynthTask> tasks,
                                              std::span<const int64_t> lengths, int64_t num,
                                              uint64_t seed, std::optional<double> depth,
                                              int64_t vt_variables) {
  MF_CHECK(num >= 1, "synthetic tasks: num must be >= 1 example per task and length, got {}", num);
  std::vector<SynthExample> examples;
  for (SynthTask task : tasks) {
    for (int64_t length : lengths) {
      for (int64_t example_idx = 0; example_idx < num; ++example_idx) {
        uint64_t example_seed = splitmix64(seed);
        example_seed = splitmix64(example_seed ^ static_cast<uint64_t>(task));
        example_seed = splitmix64(example_seed ^ static_cast<uint64_t>(length));
        example_seed = splitmix64(example_seed ^ static_cast<uint64_t>(example_idx));
        const double example_depth =
            depth.has_value()
                ? *depth
                : (num == 1 ? 0.5
                            : static_cast<double>(example_idx) / static_cast<double>(num - 1));
        examples.push_back(
            make_synth_example(task, length, example_depth, example_seed, vt_variables));
      }
    }
  }
  return examples;
}

bool synth_answer_correct(SynthTask task, std::string_view answer, std::string_view generated) {
  const std::string_view line = trim_spaces(generated.substr(0, generated.find('\n')));
  if (task == SynthTask::kNiahSingle || task == SynthTask::kNiahMultikey) {
    return line == trim_spaces(answer);
  }
  const std::vector<std::string> produced = split_answer_items(line);
  const std::vector<std::string> expected = split_answer_items(answer);
  if (expected.empty()) return false;
  const std::set<std::string> produced_set(produced.begin(), produced.end());
  return std::all_of(expected.begin(), expected.end(),
                     [&produced_set](const std::string& item) { return produced_set.count(item); });
}

void write_synth_jsonl(const fs::path& path, std::span<const SynthExample> examples) {
  io::AtomicFileWriter writer(path);
  for (const SynthExample& example : examples) {
    nlohmann::ordered_json line = {{"format_version", kSynthJsonlFormatVersion},
                                   {"task", synth_task_name(example.task)},
                                   {"length", example.length},
                                   {"depth", example.depth},
                                   {"prompt", example.prompt},
                                   {"answer", example.answer}};
    const std::string text = line.dump() + "\n";
    writer.write(std::as_bytes(std::span<const char>(text.data(), text.size())));
  }
  writer.commit();
}

std::vector<SynthExample> read_synth_jsonl(const fs::path& path) {
  MF_CHECK(fs::is_regular_file(path), "task file '{}' not found", path.string());
  std::ifstream in(path, std::ios::binary);
  MF_CHECK(in.good(), "cannot open task file '{}': {}", path.string(), std::strerror(errno));
  std::vector<SynthExample> examples;
  std::string text;
  int64_t line_no = 0;
  while (std::getline(in, text)) {
    ++line_no;
    if (trim_spaces(text).empty()) continue;
    const fs::path where = fmt::format("{}:{}", path.string(), line_no);
    nlohmann::json line;
    try {
      line = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      MF_FAIL("{}: not a JSON object: {}", where.string(), e.what());
    }
    MF_CHECK(line.is_object(), "{}: expected a JSON object", where.string());
    if (line.contains("format_version")) {
      json_format_version(line, kSynthJsonlFormatVersion, where);
    }
    SynthExample example;
    example.task = parse_synth_task(json_string_field(line, "task", where),
                                    fmt::format("{}: field 'task'", where.string()));
    example.length = json_int_field(line, "length", where);
    MF_CHECK(example.length >= 1, "{}: field 'length' must be >= 1, got {}", where.string(),
             example.length);
    const nlohmann::json& depth = json_field(line, "depth", where);
    MF_CHECK(depth.is_number() && depth.get<double>() >= 0.0 && depth.get<double>() <= 1.0,
             "{}: field 'depth' must be a number in [0, 1], got {}", where.string(), depth.dump());
    example.depth = depth.get<double>();
    example.prompt = json_string_field(line, "prompt", where);
    example.answer = json_string_field(line, "answer", where);
    MF_CHECK(!example.prompt.empty(), "{}: field 'prompt' is empty", where.string());
    MF_CHECK(!trim_spaces(example.answer).empty(), "{}: field 'answer' is empty", where.string());
    MF_CHECK(example.answer.find('\n') == std::string::npos,
             "{}: field 'answer' holds a line break; a generated answer is its first line only",
             where.string());
    MF_CHECK(synth_answer_correct(example.task, example.answer, example.answer),
             "{}: field 'answer' ({}) has no item an output could match (items are separated by "
             "commas and spaces)",
             where.string(), nlohmann::json(example.answer).dump());
    examples.push_back(std::move(example));
  }
  MF_CHECK(!in.bad(), "reading task file '{}' failed", path.string());
  MF_CHECK(!examples.empty(), "task file '{}' holds no examples", path.string());
  return examples;
}

PrepareSummary write_synth_train_dataset(std::span<const SynthExample> examples,
                                         PrepareOptions options, bool answer_only,
                                         bool all_questions) {
  MF_CHECK(!examples.empty(), "synthetic training data: no examples to write");
  fs::path target = fs::absolute(options.out_dir).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();
  MF_CHECK(target.has_filename() && target != target.root_path(),
           "synthetic training data: out_dir '{}' does not name a folder",
           options.out_dir.string());
  const fs::path text_dir =
      target.parent_path() / ("." + target.filename().string() + ".synth-text");
  // Removes the text folder however prepare_dataset ends.
  struct TextDirGuard {
    fs::path dir;
    ~TextDirGuard() {
      std::error_code ignored;
      fs::remove_all(dir, ignored);
    }
  } guard{text_dir};
  std::error_code ignored;
  fs::remove_all(text_dir, ignored);
  fs::create_directories(text_dir);
  // Each document's text and the byte ranges of its answers, laid out once here.
  std::vector<std::vector<CompletionSpan>> answer_spans(examples.size());
  for (size_t example_idx = 0; example_idx < examples.size(); ++example_idx) {
    const SynthExample& example = examples[example_idx];
    std::string text = example.prompt;
    auto add_answer = [&](const std::string& answer) {
      answer_spans[example_idx].push_back({text.size(), text.size() + answer.size()});
      text += answer;
    };
    add_answer(example.answer);
    if (all_questions) {
      for (const SynthQuestion& other : example.other_questions) {
        text += other.question;
        add_answer(other.answer);
      }
    }
    const fs::path file = text_dir / fmt::format("{:08d}-{}-{}.txt", example_idx,
                                                 synth_task_name(example.task), example.length);
    std::ofstream out(file, std::ios::binary);
    out << text;
    out.close();
    MF_CHECK(out.good(), "synthetic training data: cannot write '{}': {}", file.string(),
             std::strerror(errno));
  }
  options.inputs = {text_dir};
  options.tokenizer = "byte";
  options.record_input_paths = false;
  if (answer_only) {
    // A file's name starts with its example's index (8 digits).
    options.completion_spans = [answer_spans =
                                    std::move(answer_spans)](const InputDocument& document) {
      const size_t example_idx = std::stoull(document.relative_path.substr(0, 8));
      MF_CHECK(example_idx < answer_spans.size(), "synthetic training data: unexpected file '{}'",
               document.relative_path);
      return answer_spans[example_idx];
    };
  }
  return prepare_dataset(options);
}

}  // namespace moeforge::data
