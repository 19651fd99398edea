// The sigmoid gate of Qwen2-MoE's shared expert on the GPU (model/moe_ffn.cpp's
// shared_expert_forward, shared_output_backward and shared_gate_backward are the spec): per token
// t, score[t] = sigmoid(x[t] . w) scales the shared expert's output shared_out[t] before it joins
// the layer's output. x is the MoE layer's normed input, w the [1, hidden] gate weight. fp32 math
// on bf16 tensors; every sum runs in a fixed order (no atomics), so results are reproducible.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// out [n, h] (fp32, +=) += score * shared_out, with score [n] (assigned) = sigmoid(x . w).
// x, shared_out [n, h]; w [h].
void shared_expert_gate_forward(float* out, float* score, const bf16* x, const bf16* w,
                                const bf16* shared_out, int64_t n, int64_t h, cudaStream_t stream);

// From dout [n, h] (fp32, the gradient of out): dshared_out [n, h] (bf16, assigned) = score * dout;
// dlogit [n] (assigned) = (dout . shared_out) * score * (1 - score); dx [n, h] (fp32) += dlogit *
// w.
void shared_expert_gate_backward(bf16* dshared_out, float* dlogit, float* dx, const float* dout,
                                 const bf16* shared_out, const float* score, const bf16* w,
                                 int64_t n, int64_t h, cudaStream_t stream);

// dw [h] (fp32) += sum over tokens t of dlogit[t] * x[t]: partial sums over fixed chunks of rows,
// then the chunks in order (reductions.h's accumulate_chunk_sums).
void shared_expert_gate_backward_weight(float* dw, const float* dlogit, const bf16* x, int64_t n,
                                        int64_t h, cudaStream_t stream);

}  // namespace moeforge::cuda
