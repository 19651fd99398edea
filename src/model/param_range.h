// A range of a flat parameter (or gradient) buffer, shared by the parameter layout, the gradient
// sums and their buckets. Plain C++17: CUDA sources include it.
#pragma once

#include <cstdint>

namespace moeforge {

// [offset, offset + count) of a flat buffer, in elements.
struct ParamRange {
  int64_t offset = 0;
  int64_t count = 0;
};

inline bool operator==(const ParamRange& a, const ParamRange& b) {
  return a.offset == b.offset && a.count == b.count;
}

}  // namespace moeforge
