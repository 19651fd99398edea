// The moeforge command line: one subcommand per job, each registered from its own file.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "core/error.h"

namespace {

// Under mpirun one failing rank must end the whole job, or the others wait for it forever.
int fail(int exit_code) {
  if (moeforge::world_communicator().size() > 1) moeforge::abort_world(exit_code);
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeforge: train, merge and serve Mixture-of-Experts language models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moeforge 0.1.0");
  moeforge::cli::register_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moeforge::Error& e) {
    std::fprintf(stderr, "moeforge: error: %s\n", e.what());
    return fail(1);
  } catch (const std::filesystem::filesystem_error& e) {
    // A full disk, a missing permission, a path through a regular file: the user's to fix.
    std::fprintf(stderr, "moeforge: error: %s\n", e.what());
    return fail(1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moeforge: unexpected error: %s\n", e.what());
    return fail(2);
  }
  return 0;
}
