// Fuzz target: the checkpoint directory loader. The input holds the files of one checkpoint of a
// fixed tiny Mixtral (config.json, model.safetensors, optimizer.safetensors, trainer_state.json)
// and the run's checkpoints/index.json, separated by fuzz::kFileSeparator (an empty part means the
// file is missing). It runs what `moeforge train --resume RUN` runs before training:
// resolve_checkpoint (the index), load_checkpoint (config, weights, optimizer moments, trainer
// state) and the data loader state. moeforge::Error is the expected outcome for bad input;
// anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <iterator>

#include "comm/communicator.h"
#include "core/error.h"
#include "data/loader.h"
#include "fuzz_input.h"
#include "io/checkpoint_index.h"
#include "model/model_config.h"
#include "model/transformer.h"
#include "train/adamw.h"
#include "train/checkpoint.h"

namespace {

using namespace moeforge;

// The model the seed checkpoints were written for (fuzz/make_seeds.py writes the same one).
ModelConfig fuzz_model_config() {
  ModelConfig c;
  c.architecture = Architecture::kMixtral;
  c.vocab_size = 8;
  c.hidden_size = 4;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 2;
  c.intermediate_size = 4;
  c.max_position_embeddings = 16;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 1e6;
  c.num_experts = 2;
  c.num_experts_per_tok = 1;
  c.moe_intermediate_size = 4;
  c.router_aux_loss_coef = 0.01;
  return c;
}

struct FuzzModel {
  SelfCommunicator expert_group;
  Transformer<float> model{fuzz_model_config(), expert_group};
  AdamW optimizer{model.layout(), AdamWHyper{}, {"norm"}};
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static FuzzModel fuzz_model;
  const auto run_dir = fuzz::scratch_dir() / "run";
  const auto checkpoint_dir = checkpoint_dir_name(run_dir, 1);
  const char* names[] = {"config.json", "model.safetensors", "optimizer.safetensors",
                         "trainer_state.json"};
  const auto parts = fuzz::split_files(data, size, std::size(names) + 1);  // + the index
  for (size_t file_idx = 0; file_idx < std::size(names); ++file_idx) {
    fuzz::write_bytes(checkpoint_dir / names[file_idx], parts[file_idx], /*remove_if_empty=*/true);
  }
  fuzz::write_bytes(run_dir / "checkpoints" / "index.json", parts[std::size(names)],
                    /*remove_if_empty=*/true);
  try {
    io::read_checkpoint_index(run_dir);
    resolve_checkpoint(run_dir);
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  try {
    const TrainerState state =
        load_checkpoint(checkpoint_dir, fuzz_model.model, fuzz_model.optimizer);
    state.loader.get<data::LoaderState>();
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
