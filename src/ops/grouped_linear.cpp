// Grouped linear over expert row groups: one GEMM per non-empty group.
#include "ops/grouped_linear.h"

#include "core/error.h"
#include "ops/gemm.h"

namespace moeforge::ops {

namespace {

void check_offsets(const int64_t* offsets, int64_t num_groups) {
  MF_CHECK(num_groups >= 0, "grouped_linear: num_groups ({}) must be >= 0", num_groups);
  for (int64_t e = 0; e < num_groups; ++e) {
    MF_CHECK(offsets[e] >= 0 && offsets[e] <= offsets[e + 1],
             "grouped_linear: offsets of group {} ([{}, {})) must be non-negative and ordered", e,
             offsets[e], offsets[e + 1]);
  }
}

}  // namespace

template <typename T>
void grouped_linear_forward(T* out, const T* inp, const T* weight, const int64_t* offsets,
                            int64_t num_groups, int64_t c, int64_t oc) {
  check_offsets(offsets, num_groups);
  for (int64_t e = 0; e < num_groups; ++e) {
    const int64_t num_rows = offsets[e + 1] - offsets[e];
    if (num_rows == 0) continue;
    // out[rows] [num_rows, oc] = inp[rows] [num_rows, c] @ weight[e]^T
    gemm<T>(false, true, num_rows, oc, c, T(1), inp + offsets[e] * c, c, weight + e * oc * c, c,
            T(0), out + offsets[e] * oc, oc);
  }
}

template <typename T>
void grouped_linear_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                             const int64_t* offsets, int64_t num_groups, int64_t c, int64_t oc) {
  check_offsets(offsets, num_groups);
  for (int64_t e = 0; e < num_groups; ++e) {
    const int64_t num_rows = offsets[e + 1] - offsets[e];
    if (num_rows == 0) continue;
    const T* dout_e = dout + offsets[e] * oc;  // [num_rows, oc]
    // dinp[rows] [num_rows, c] = dout_e @ weight[e]
    gemm<T>(false, false, num_rows, c, oc, T(1), dout_e, oc, weight + e * oc * c, c, T(0),
            dinp + offsets[e] * c, c);
    // dweight[e] [oc, c] += dout_e^T @ inp[rows]
    gemm<T>(true, false, oc, c, num_rows, T(1), dout_e, oc, inp + offsets[e] * c, c, T(1),
            dweight + e * oc * c, c);
  }
}

#define MOEFORGE_INSTANTIATE_GROUPED_LINEAR(T)                                                   \
  template void grouped_linear_forward<T>(T*, const T*, const T*, const int64_t*, int64_t,       \
                                          int64_t, int64_t);                                     \
  template void grouped_linear_backward<T>(T*, T*, const T*, const T*, const T*, const int64_t*, \
                                           int64_t, int64_t, int64_t);
MOEFORGE_INSTANTIATE_GROUPED_LINEAR(float)
MOEFORGE_INSTANTIATE_GROUPED_LINEAR(double)
#undef MOEFORGE_INSTANTIATE_GROUPED_LINEAR

}  // namespace moeforge::ops
