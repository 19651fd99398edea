// Small elementwise helpers used between layers.
#pragma once

#include <cstdint>

namespace moeforge::ops {

// dst[i] += src[i]
template <typename T>
void add_inplace(T* dst, const T* src, int64_t n);

// out[i] = a[i] + b[i]
template <typename T>
void add(T* out, const T* a, const T* b, int64_t n);

}  // namespace moeforge::ops
