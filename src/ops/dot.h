// The dot product the attention references share: accumulated in double in index order.
#pragma once

#include <cstdint>

namespace moeforge::ops {

template <typename T>
double dot_double(const T* a, const T* b, int64_t len) {
  double sum = 0.0;
  for (int64_t i = 0; i < len; ++i) sum += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return sum;
}

}  // namespace moeforge::ops
