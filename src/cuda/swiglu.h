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

// The same on tensors of [num_rows, width] of which only the rows [0, *used_rows) are in use
// (the MoE expert rows of a row map: used_rows is its expert_offsets[E]). used_rows is a device
// int32 (at most num_rows) that the kernels read, so the host never waits for it; the elements
// past those rows are neither read nor written. used_rows null: every row (the calls above).
void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, const int32_t* used_rows,
                    int64_t num_rows, int64_t width, cudaStream_t stream);
void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     const int32_t* used_rows, int64_t num_rows, int64_t width,
                     cudaStream_t stream);

}  // namespace moeforge::cuda
