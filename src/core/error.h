// The one error type of the library and the CHECK macros that raise it.
// The library throws moeforge::Error; the CLI catches it and prints the message.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moeforge {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

[[noreturn]] void throw_error(const char* file, int line, const std::string& message);

}  // namespace moeforge

// MF_CHECK(cond, "format {}", args...): throws moeforge::Error with the message and file:line.
#define MF_CHECK(cond, ...)                                                    \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ::moeforge::throw_error(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__)); \
    }                                                                          \
  } while (0)

// MF_FAIL("format {}", args...): unconditional throw.
#define MF_FAIL(...) ::moeforge::throw_error(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__))
