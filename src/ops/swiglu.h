// SwiGLU activation: out = silu(gate) * up, silu(x) = x / (1 + exp(-x)).
#pragma once

#include <cstdint>

namespace moeforge::ops {

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n);

// dgate, dup assign.
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n);

}  // namespace moeforge::ops
