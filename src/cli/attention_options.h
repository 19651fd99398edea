// The prefill attention options shared by `moeforge generate` and `moeforge eval`:
// --attention dense|flex --gamma --tau --min-budget --max-budget --block-size --flex-search
// (`moeforge bench prefill` registers its own, with parse_flex_search).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

#include "model/prefill_attention.h"

namespace moeforge::cli {

struct AttentionOptions {
  std::string attention = "dense";
  double gamma = 0.9;
  double tau = 0.1;
  int64_t min_budget = 1024;
  int64_t max_budget = 0;
  int64_t block_size = 128;
  std::string flex_search = "fast";
};

void add_attention_options(CLI::App* cmd, AttentionOptions& opts);

// Throws moeforge::Error naming the option if a value is invalid (checked whatever --attention).
// On --device cpu the search is recorded as exact whatever --flex-search says, since the CPU
// reference always searches exactly.
PrefillAttention parse_attention_options(const AttentionOptions& opts, const std::string& device);

// The --flex-search value: "exact" or "fast" (ops::FlexSearch::kFp32); throws moeforge::Error
// naming the option otherwise.
ops::FlexSearch parse_flex_search(const std::string& name);

// --flex-search's help text.
extern const char* const kFlexSearchHelp;

}  // namespace moeforge::cli
