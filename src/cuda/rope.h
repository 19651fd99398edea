// Rotary position embedding on the GPU (ops/rope.h is the spec: HF rotate-half). The angles come
// from a table computed on the host in double and rounded once to fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// cos and sin of position * theta^(-2i / head_dim), each [num_positions, head_dim / 2].
struct RopeTable {
  std::vector<float> cos, sin;
};
RopeTable make_rope_table(int64_t num_positions, int64_t head_dim, double theta);

// out, inp [n, num_heads, head_dim] (out may alias inp); positions [n] index the tables.
void rope_forward(bf16* out, const bf16* inp, const int32_t* positions, const float* cos_table,
                  const float* sin_table, int64_t n, int64_t num_heads, int64_t head_dim,
                  cudaStream_t stream);
// The transpose rotation (dinp may alias dout).
void rope_backward(bf16* dinp, const bf16* dout, const int32_t* positions, const float* cos_table,
                   const float* sin_table, int64_t n, int64_t num_heads, int64_t head_dim,
                   cudaStream_t stream);

}  // namespace moeforge::cuda
