// Grouped linear over variable-size expert groups: rows [offsets[e], offsets[e+1]) use weight e.
// weight [num_groups, oc, c] (nn.Linear layout per expert).
#pragma once

#include <cstdint>

namespace moeforge::ops {

// out[r, :] = inp[r, :] @ weight[e]^T for r in group e.
template <typename T>
void grouped_linear_forward(T* out, const T* inp, const T* weight, const int64_t* offsets,
                            int64_t num_groups, int64_t c, int64_t oc);

// dinp (assign), dweight (accumulate).
template <typename T>
void grouped_linear_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                             const int64_t* offsets, int64_t num_groups, int64_t c, int64_t oc);

}  // namespace moeforge::ops
