// Causal grouped-query attention on the GPU, forward with the log-sum-exp saved and backward.
// ops/attention.h is the spec (scale 1 / sqrt(head_dim), query head h reads KV head h / group).
// Tensors are in the model's token-major layout: q [batch, seq, num_q_heads, head_dim], k and v
// [batch, seq, num_kv_heads, head_dim], out like q.
//
// Backends: cuDNN's fused scaled-dot-product attention (cuDNN frontend graph API; one execution
// plan per shape and direction, built on first use and cached) where it runs, else our own kernels
// (attention_fallback.h: any GPU, head_dim up to 256). "Where it runs" is the frontend's answer for
// the shape and direction: if building the graph fails (its validation, heuristics, support check
// or plan building; e.g. head_dim not a multiple of 8, or above the backward's limit of 128 or 256
// by cuDNN version), that shape and direction runs ours from then on. The two directions may
// differ: both backends save the same lse. The backward of seq == 1, which cuDNN rejects, is exact
// in a kernel of its own (attention_single_key.h). AttentionBackend::ours forces our kernels for
// every shape (tests, benchmarks), seq == 1 included.
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

class AttentionFallback;

// automatic: cuDNN where the frontend accepts the shape, else ours; ours: always ours.
enum class AttentionBackend { automatic, ours };

class Attention {
 public:
  explicit Attention(AttentionBackend backend = AttentionBackend::automatic);
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
  AttentionBackend backend_;
  std::unique_ptr<Graphs> graphs_;
  std::unique_ptr<AttentionFallback> fallback_;
};

}  // namespace moeforge::cuda
