// Causal grouped-query attention on the GPU through cuDNN's fused scaled-dot-product attention
// (cuDNN frontend graph API), forward with the log-sum-exp saved and backward. ops/attention.h is
// the spec (scale 1 / sqrt(head_dim), query head h reads KV head h / group). Tensors are in the
// model's token-major layout: q [batch, seq, num_q_heads, head_dim], k and v
// [batch, seq, num_kv_heads, head_dim], out like q. One execution plan is built per shape and
// cached.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "cuda/bf16.h"
#include "cuda/device_memory.h"

namespace moeforge::cuda {

struct AttentionShape {
  int64_t batch, seq, num_q_heads, num_kv_heads, head_dim;
};

class Attention {
 public:
  Attention();
  ~Attention();
  Attention(const Attention&) = delete;
  Attention& operator=(const Attention&) = delete;

  // lse [batch, num_q_heads, seq] (fp32, natural log) is saved for the backward.
  void forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
               const AttentionShape& shape, cudaStream_t stream);
  // dq, dk, dv assigned.
  void backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                const bf16* v, const bf16* out, const float* lse, const AttentionShape& shape,
                cudaStream_t stream);

 private:
  struct Graphs;
  std::unique_ptr<Graphs> graphs_;
};

}  // namespace moeforge::cuda
