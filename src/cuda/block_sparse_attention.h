// Causal block-sparse grouped-query attention forward on the GPU, FlashAttention-style: per
// (query head, 64 or 128 query rows) one block of threads walks the row's selected key blocks in
// ascending order with an online softmax in fp32, and writes the output (bf16) and the natural-log
// log-sum-exp of each row (fp32), as ops/block_sparse_attention.h defines them. Three kernels:
// - tensor_core (block_sparse_attention_tc.cu): mma.sync bf16 tiles, sm_80 and later, head_dim 64
//   or 128; P is rounded to bf16 before P V, as in cuDNN and FlashAttention.
// - hopper (block_sparse_attention_sm90.cu): TMA + wgmma, warp specialised, sm_90a, head_dim 64
//   or 128; P in bf16 as above.
// - portable (any GPU, any head_dim up to 256): scalar fp32 throughout; the fallback for other
//   shapes and the tensor-core kernel's tighter check.
// They serve dense prefill where cuDNN does not run, FlexPrefill's selections, and its dense
// fallback (every causal block listed).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"
#include "cuda/device_memory.h"
#include "ops/block_sparse_attention.h"

namespace moeforge::cuda {

// The CSR of ops::BlockSparseLayout in device memory (row h * num_blocks + r).
struct DeviceBlockSparseLayout {
  const int64_t* row_offsets = nullptr;  // [num_heads * num_blocks + 1]
  const int32_t* col_idx = nullptr;
  int64_t num_heads = 0, num_blocks = 0, block_size = 0;
};

// A host layout copied to the device (owns the buffers).
struct DeviceBlockSparseLayoutBuffers {
  DeviceBuffer<int64_t> row_offsets;
  DeviceBuffer<int32_t> col_idx;
  int64_t num_heads = 0, num_blocks = 0, block_size = 0;
  DeviceBlockSparseLayout view() const {
    return {row_offsets.data(), col_idx.data(), num_heads, num_blocks, block_size};
  }
};
DeviceBlockSparseLayoutBuffers upload_layout(const ops::BlockSparseLayout& layout);

// q [seq_len, num_q_heads, head_dim], k and v [seq_len, num_kv_heads, head_dim] (bf16, device);
// out [seq_len, num_q_heads, head_dim] (bf16, assigned); lse [num_q_heads, seq_len] (fp32,
// assigned; may be null). The layout must satisfy ops::check_block_sparse_layout (not checked on
// the device: it is read there); block_size a multiple of 64; head_dim <= 256. `automatic` takes
// the Hopper kernel where it runs, else the tensor-core kernel where it runs; asking for a kernel
// where it cannot run is an error.
// Asynchronous.
enum class BlockSparseKernel { automatic, portable, tensor_core, hopper };
void block_sparse_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k,
                                    const bf16* v, const DeviceBlockSparseLayout& layout,
                                    const ops::SparseAttentionDims& dims, cudaStream_t stream,
                                    BlockSparseKernel kernel = BlockSparseKernel::automatic);

}  // namespace moeforge::cuda
