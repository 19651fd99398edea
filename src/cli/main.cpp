// The moeforge command line: one subcommand per job, each registered from its own file.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "core/error.h"

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
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moeforge: unexpected error: %s\n", e.what());
    return 2;
  }
  return 0;
}
