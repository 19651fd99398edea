// Causal grouped-query attention (reference: materialises the probabilities).
// Query head h reads KV head h / (num_q_heads / num_kv_heads). Scale 1/sqrt(head_dim).
// Queries are the last num_q positions of a num_k-long sequence: query i sits at absolute
// position num_k - num_q + i and attends to keys 0..that position (training: num_q == num_k;
// decoding with a KV cache: num_q < num_k).
#pragma once

#include <cstdint>

namespace moeforge::ops {

struct AttentionDims {
  int64_t batch;
  int64_t num_q;  // query positions per sequence
  int64_t num_k;  // key positions per sequence (>= num_q)
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
};

// q [batch, num_q, num_q_heads, head_dim]; k, v [batch, num_k, num_kv_heads, head_dim]
// out [batch, num_q, num_q_heads, head_dim]; probs [batch, num_q_heads, num_q, num_k] (saved;
// masked entries are 0). probs may be null when no backward follows.
template <typename T>
void attention_forward(T* out, T* probs, const T* q, const T* k, const T* v,
                       const AttentionDims& dims);

// dq, dk, dv assign (same shapes as q, k, v).
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                        const T* probs, const AttentionDims& dims);

}  // namespace moeforge::ops
