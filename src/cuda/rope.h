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
// The same over rows with strides: token t's heads start at element t * stride of each tensor,
// e.g. the q or k part of a packed [n, q_dim + 2 kv_dim] projection (strides >= the row's
// num_heads * head_dim elements; in place only with equal strides).
void rope_forward_strided(bf16* out, int64_t out_stride, const bf16* inp, int64_t inp_stride,
                          const int32_t* positions, const float* cos_table, const float* sin_table,
                          int64_t n, int64_t num_heads, int64_t head_dim, cudaStream_t stream);
void rope_backward_strided(bf16* dinp, int64_t dinp_stride, const bf16* dout, int64_t dout_stride,
                           const int32_t* positions, const float* cos_table, const float* sin_table,
                           int64_t n, int64_t num_heads, int64_t head_dim, cudaStream_t stream);

}  // namespace moeforge::cuda
