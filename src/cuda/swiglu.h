// SwiGLU on the GPU (ops/swiglu.h is the spec), fp32 math on bf16 tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// out = silu(gate) * up, all [count].
void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, int64_t count,
                    cudaStream_t stream);
// dgate, dup assigned. dgate may be dout itself (in place: each element is read before it is
// written).
void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     int64_t count, cudaStream_t stream);

}  // namespace moeforge::cuda
