// Registration of the CLI subcommands; each lives in its own <name>_command.cpp file and runs
// from a CLI11 callback, so errors propagate to main() as exceptions.
#pragma once

#include <CLI/CLI.hpp>

#include <filesystem>
#include <string>

namespace moeforge::cli {

void register_commands(CLI::App& app);

// A model directory (holding config.json) given itself, a checkpoint, or a run directory (then its
// newest checkpoint).
std::filesystem::path resolve_model_dir(const std::string& path);

void register_train_command(CLI::App& app);
void register_init_command(CLI::App& app);
void register_merge_command(CLI::App& app);
void register_eval_command(CLI::App& app);
void register_forward_command(CLI::App& app);
void register_generate_command(CLI::App& app);
void register_data_command(CLI::App& app);
void register_inspect_command(CLI::App& app);
void register_devices_command(CLI::App& app);
void register_bench_command(CLI::App& app);
// `bench comm` (bench_comm_command.cpp), under the `bench` command.
void add_bench_comm_command(CLI::App& bench);

}  // namespace moeforge::cli
