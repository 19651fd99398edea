// Shared helpers of the libFuzzer targets: a per-process scratch folder, writing fuzz bytes into
// files there, and splitting one fuzz input into several files at a separator line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge {
class Error;
}

namespace moeforge::fuzz {

// Separates the files of a multi-file input (see split_files); the seed generator uses it too.
inline constexpr std::string_view kFileSeparator = "\n@@file@@\n";

// A folder unique to this process under $TMPDIR, else /dev/shm (file writes there are ~50x faster
// than on disk, which sets the fuzzing speed), else /tmp; created on first use, removed at exit.
const std::filesystem::path& scratch_dir();

// The input cut at each kFileSeparator: always exactly num_files parts, missing ones empty and
// anything after the last separator kept in the last part.
std::vector<std::string_view> split_files(const uint8_t* data, size_t size, size_t num_files);

// Replaces path's contents with bytes (creating parent folders); an empty view with
// remove_if_empty set deletes the file instead, so targets can also fuzz "file is missing".
void write_bytes(const std::filesystem::path& path, std::string_view bytes,
                 bool remove_if_empty = false);

// Called for every moeforge::Error a target catches (the expected outcome for bad input): prints
// its message when MOEFORGE_FUZZ_VERBOSE is set, e.g. to check that a seed is accepted.
void rejected(const Error& error);

}  // namespace moeforge::fuzz
