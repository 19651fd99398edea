// Linear layer in the HF nn.Linear layout: weight [out_features, in_features].
#pragma once

#include <cstdint>

namespace moeforge::ops {

// out[n, oc] = inp[n, c] @ weight[oc, c]^T + bias[oc]   (bias may be null)
template <typename T>
void linear_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t n, int64_t c,
                    int64_t oc);

// dinp[n, c] = dout @ weight            (assign; skipped when dinp is null)
// dweight[oc, c] += dout^T @ inp        (accumulate)
// dbias[oc] += sum over rows of dout    (accumulate; skipped when dbias is null)
template <typename T>
void linear_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                     int64_t n, int64_t c, int64_t oc);

}  // namespace moeforge::ops
