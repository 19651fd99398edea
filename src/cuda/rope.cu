// RoPE kernels: one thread per (token, head, pair), or per four consecutive pairs where head_dim
// allows; the angle table comes from the host.
#include <cmath>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/rope.h"

namespace moeforge::cuda {
namespace {

// kWidth consecutive pairs per thread (1, or 4 with 8-byte bf16 and 16-byte table accesses).
template <int kWidth>
__global__ void rope_kernel(bf16* out, int64_t out_stride, const bf16* inp, int64_t inp_stride,
                            const int32_t* positions, const float* cos_table,
                            const float* sin_table, int64_t n, int64_t num_heads, int64_t half,
                            float direction) {
  const int64_t groups = half / kWidth;
  const int64_t total = n * num_heads * groups;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = (idx % groups) * kWidth;
    const int64_t token_head = idx / groups;
    const int64_t token_idx = token_head / num_heads;
    const int64_t head_offset = (token_head % num_heads) * 2 * half;
    const bf16* x = inp + token_idx * inp_stride + head_offset;
    bf16* y = out + token_idx * out_stride + head_offset;
    const int64_t table_idx = static_cast<int64_t>(positions[token_idx]) * half + i;
    float c[kWidth], s[kWidth], x1[kWidth], x2[kWidth], y1[kWidth], y2[kWidth];
    load_cols<kWidth>(c, cos_table + table_idx);
    load_cols<kWidth>(s, sin_table + table_idx);
    load_cols<kWidth>(x1, x + i);
    load_cols<kWidth>(x2, x + i + half);
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      // Explicit roundings, so both widths give the same bits whatever the compiler contracts.
      const float sk = direction * s[k];
      y1[k] = __fmaf_rn(x1[k], c[k], -__fmul_rn(x2[k], sk));
      y2[k] = __fmaf_rn(x2[k], c[k], __fmul_rn(x1[k], sk));
    }
    store_cols<kWidth>(y + i, y1);
    store_cols<kWidth>(y + i + half, y2);
  }
}

void launch_rope(bf16* out, int64_t out_stride, const bf16* inp, int64_t inp_stride,
                 const int32_t* positions, const float* cos_table, const float* sin_table,
                 int64_t n, int64_t num_heads, int64_t head_dim, float direction,
                 cudaStream_t stream) {
  MF_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be positive and even, got {}",
           head_dim);
  MF_CHECK(out_stride >= num_heads * head_dim && inp_stride >= num_heads * head_dim,
           "rope: row strides {} and {} are below the {} elements of a row", out_stride, inp_stride,
           num_heads * head_dim);
  const int64_t half = head_dim / 2;
  const int64_t total = n * num_heads * half;
  if (total == 0) return;
  constexpr int kThreads = 256;
  // 8-byte bf16 accesses need every row start 8-byte aligned: strides of 4 elements.
  if (half % 4 == 0 && out_stride % 4 == 0 && inp_stride % 4 == 0 &&
      aligned_to(16, out, inp, cos_table, sin_table)) {
    rope_kernel<4><<<grid_for(total / 4, kThreads), kThreads, 0, stream>>>(
        out, out_stride, inp, inp_stride, positions, cos_table, sin_table, n, num_heads, half,
        direction);
  } else {
    rope_kernel<1><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        out, out_stride, inp, inp_stride, positions, cos_table, sin_table, n, num_heads, half,
        direction);
  }
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

RopeTable make_rope_table(int64_t num_positions, int64_t head_dim, double theta) {
  MF_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be positive and even, got {}",
           head_dim);
  MF_CHECK(theta > 0.0, "rope: theta must be positive, got {}", theta);
  const int64_t half = head_dim / 2;
  RopeTable table;
  table.cos.resize(static_cast<size_t>(num_positions * half));
  table.sin.resize(table.cos.size());
  for (int64_t i = 0; i < half; ++i) {
    const double inv_freq =
        1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      const double angle = static_cast<double>(pos) * inv_freq;
      table.cos[static_cast<size_t>(pos * half + i)] = static_cast<float>(std::cos(angle));
      table.sin[static_cast<size_t>(pos * half + i)] = static_cast<float>(std::sin(angle));
    }
  }
  return table;
}

void rope_forward(bf16* out, const bf16* inp, const int32_t* positions, const float* cos_table,
                  const float* sin_table, int64_t n, int64_t num_heads, int64_t head_dim,
                  cudaStream_t stream) {
  launch_rope(out, num_heads * head_dim, inp, num_heads * head_dim, positions, cos_table, sin_table,
              n, num_heads, head_dim, 1.0f, stream);
}

void rope_backward(bf16* dinp, const bf16* dout, const int32_t* positions, const float* cos_table,
                   const float* sin_table, int64_t n, int64_t num_heads, int64_t head_dim,
                   cudaStream_t stream) {
  launch_rope(dinp, num_heads * head_dim, dout, num_heads * head_dim, positions, cos_table,
              sin_table, n, num_heads, head_dim, -1.0f, stream);
}

void rope_forward_strided(bf16* out, int64_t out_stride, const bf16* inp, int64_t inp_stride,
                          const int32_t* positions, const float* cos_table, const float* sin_table,
                          int64_t n, int64_t num_heads, int64_t head_dim, cudaStream_t stream) {
  launch_rope(out, out_stride, inp, inp_stride, positions, cos_table, sin_table, n, num_heads,
              head_dim, 1.0f, stream);
}

void rope_backward_strided(bf16* dinp, int64_t dinp_stride, const bf16* dout, int64_t dout_stride,
                           const int32_t* positions, const float* cos_table, const float* sin_table,
                           int64_t n, int64_t num_heads, int64_t head_dim, cudaStream_t stream) {
  launch_rope(dinp, dinp_stride, dout, dout_stride, positions, cos_table, sin_table, n, num_heads,
              head_dim, -1.0f, stream);
}

}  // namespace moeforge::cuda
