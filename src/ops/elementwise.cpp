// Elementwise add helpers on the CPU.
#include "ops/elementwise.h"

#include "core/error.h"

namespace moeforge::ops {

template <typename T>
void add_inplace(T* dst, const T* src, int64_t n) {
  MF_CHECK(n >= 0, "add_inplace: negative length n={}", n);
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

template <typename T>
void add(T* out, const T* a, const T* b, int64_t n) {
  MF_CHECK(n >= 0, "add: negative length n={}", n);
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template void add_inplace<float>(float*, const float*, int64_t);
template void add_inplace<double>(double*, const double*, int64_t);
template void add<float>(float*, const float*, const float*, int64_t);
template void add<double>(double*, const double*, const double*, int64_t);

}  // namespace moeforge::ops
