// The launch arguments shared by the kernels behind cuda::block_sparse_attention_forward
// (block_sparse_attention.h), and the tensor-core kernel for sm_80 and later
// (block_sparse_attention_tc.cu) and the Hopper kernel (block_sparse_attention_sm90.cu); the
// portable kernel is private to block_sparse_attention.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// Shapes checked by the caller; the layout's CSR is read on the device.
struct BlockSparseLaunch {
  bf16* out;
  float* lse;
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const int64_t* row_offsets;
  const int32_t* col_idx;
  int64_t num_blocks, block_size, seq_len;
  int num_q_heads, num_kv_heads, head_dim;
  float scale_log2;  // softmax scale times log2(e)
};

// Whether the tensor-core kernel runs these arguments on a device of this compute capability
// major: sm_80 or later, head_dim 64 or 128, block_size a multiple of 64, 16-byte aligned tensors.
bool tensor_core_block_sparse_attention_runs(const BlockSparseLaunch& args, int device_major);
void launch_tensor_core_block_sparse_attention(const BlockSparseLaunch& args, cudaStream_t stream);

// The Hopper kernel (block_sparse_attention_sm90.cu): sm_90 (built for sm_90a), head_dim 64 or
// 128, block_size a multiple of 64, 16-byte aligned tensors.
bool hopper_block_sparse_attention_runs(const BlockSparseLaunch& args, int device_major);
void launch_hopper_block_sparse_attention(const BlockSparseLaunch& args, cudaStream_t stream);

}  // namespace moeforge::cuda
