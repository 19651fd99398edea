// Builds the message of moeforge::Error with the place that raised it.
#include "core/error.h"

#include <cstring>

namespace moeforge {

void throw_error(const char* file, int line, const std::string& message) {
  const char* base = std::strrchr(file, '/');
  throw Error(fmt::format("{} [{}:{}]", message, base ? base + 1 : file, line));
}

}  // namespace moeforge
