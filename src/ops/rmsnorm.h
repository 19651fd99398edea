// RMSNorm as in HF Llama: out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps).
#pragma once

#include <cstdint>

namespace moeforge::ops {

// inp, out [n, c]; weight [c]; rstd [n] saved for backward.
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t n, int64_t c,
                     double eps);

// dinp [n, c] (assign); dweight [c] (accumulate).
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int64_t n, int64_t c);

}  // namespace moeforge::ops
