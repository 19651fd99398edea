// Our own causal grouped-query attention on any GPU, for the shapes cuDNN's fused attention does
// not run (head_dim not a multiple of 8 or above its limit) and for tests and benchmarks that force
// it (cuda::Attention, attention.h, chooses). Same contract and layout as cuda::Attention: q
// [batch, seq, num_q_heads, head_dim], k and v [batch, seq, num_kv_heads, head_dim], out like q,
// lse [batch, num_q_heads, seq] (fp32, natural log), scale 1 / sqrt(head_dim), head_dim 1..256.
// - forward: the portable block-sparse kernel (block_sparse_attention.h) over the dense causal
//   layout, one launch per batch element (its [seq, heads, head_dim] tensors and [heads, seq] lse
//   are exactly one batch element of ours). fp32 arithmetic, P not rounded.
// - backward: FlashAttention-2's backward in fp32 on bf16 inputs (attention_fallback.cu),
//   deterministic (no atomics): D = rowsum(dout * out), then one kernel per (batch, KV head, key
//   block) for dk and dv over the query heads of its group, and one per (batch, query head, query
//   block) for dq, both recomputing P = exp(S * scale - lse) from the saved lse.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention.h"
#include "cuda/bf16.h"
#include "cuda/block_sparse_attention.h"
#include "cuda/device_memory.h"

namespace moeforge::cuda {

constexpr int64_t kAttentionFallbackMaxHeadDim = 256;

// Owns the forward's dense causal layout (rebuilt when num_q_heads or seq change) and the
// backward's D workspace [batch, num_q_heads, seq] (grown as needed). Asynchronous, except for
// the layout's upload when it changes.
class AttentionFallback {
 public:
  // out and lse assigned.
  void forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
               const AttentionShape& shape, cudaStream_t stream);
  // dq, dk, dv assigned.
  void backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                const bf16* v, const bf16* out, const float* lse, const AttentionShape& shape,
                cudaStream_t stream);

 private:
  DeviceBlockSparseLayoutBuffers layout_;
  DeviceBuffer<float> delta_;
};

}  // namespace moeforge::cuda
