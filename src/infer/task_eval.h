// `moeforge eval --task`: accuracy of greedy generation on synthetic long-context tasks (from
// `moeforge data synth`), per task and prompt length, with the mean density of the sparse prefills
// when the engine's prefill attention is FlexPrefill.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "comm/communicator.h"
#include "data/synth_tasks.h"
#include "data/tokenizer.h"
#include "infer/inference_engine.h"

namespace moeforge {

// Runs every example (example i on rank i % world size; greedy decoding for the answer's tokens
// plus a few) and returns the JSON report, the same on every rank after an all-reduce. Throws,
// naming task_file and the example, when a prompt does not fit the model's positions.
// generated (may be null): resized to the examples, it receives the decoded text of the examples
// this rank ran (the others stay empty).
nlohmann::ordered_json evaluate_synth_tasks(InferenceEngine& engine,
                                            const data::Tokenizer& tokenizer,
                                            const std::vector<data::SynthExample>& examples,
                                            const std::string& task_file, bool flex,
                                            Communicator& world,
                                            std::vector<std::string>* generated = nullptr);

}  // namespace moeforge
