// Rotary position embedding in the HF "rotate half" convention:
//   inv_freq[i] = theta^(-2i / head_dim), i < head_dim / 2; angle = position * inv_freq[i]
//   out[..., i]        = x[i] * cos - x[i + d/2] * sin
//   out[..., i + d/2]  = x[i + d/2] * cos + x[i] * sin
#pragma once

#include <cstdint>

namespace moeforge::ops {

// inp, out [n, num_heads, head_dim]; positions [n]. out may alias inp.
template <typename T>
void rope_forward(T* out, const T* inp, const int32_t* positions, int64_t n, int64_t num_heads,
                  int64_t head_dim, double theta);

// dinp (assign; may alias dout): the transpose rotation.
template <typename T>
void rope_backward(T* dinp, const T* dout, const int32_t* positions, int64_t n, int64_t num_heads,
                   int64_t head_dim, double theta);

}  // namespace moeforge::ops
