// Attention of a few new queries over a KV cache on the GPU (ops/attention.h is the spec: scale
// 1 / sqrt(head_dim), query head h reads KV head h / group, causal): the decode step (one query)
// and prefills that continue a non-empty cache. fp32 math on bf16 inputs, bf16 output.
//
// One block of 128 threads per (query, KV head, up to 8 of its query heads, key split): the query
// heads of a KV head share every K and V read; the keys of a split are walked in tiles of 128
// with an online softmax (one key per thread for the scores, then 16-byte V rows for P V). With
// more than one split (chosen so that about two waves of blocks cover the GPU), each block writes
// its partial (max, sum, unnormalised output) to a workspace and a second kernel combines them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"
#include "cuda/device_memory.h"

namespace moeforge::cuda {

constexpr int64_t kDecodeAttentionMaxHeadDim = 256;

struct DecodeAttentionDims {
  int64_t num_queries;  // new positions start .. start + num_queries - 1
  int64_t start;        // cached positions before the first query
  int64_t num_q_heads, num_kv_heads, head_dim;
};

// q [num_queries, num_q_heads, head_dim]; k, v [start + num_queries, num_kv_heads, head_dim] (the
// cache, the new positions' keys and values included); query i attends to keys 0 .. start + i.
// out [num_queries, num_q_heads, head_dim] assigned. workspace grows as needed (never shrinks).
// head_dim a multiple of 8 up to kDecodeAttentionMaxHeadDim, 16-byte aligned tensors; throws
// moeforge::Error naming the value otherwise. Asynchronous on stream.
void decode_attention_forward(bf16* out, const bf16* q, const bf16* k, const bf16* v,
                              const DecodeAttentionDims& dims, DeviceBuffer<float>& workspace,
                              cudaStream_t stream);

// Key splits the launch uses for these dims (1: no workspace, no combine kernel).
int64_t decode_attention_num_splits(const DecodeAttentionDims& dims);

}  // namespace moeforge::cuda
