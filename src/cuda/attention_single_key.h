// Backward of causal attention over sequences of one position, which cuDNN rejects: the output is
// the single value row, so dq = dk = 0 and dv is the sum of dout over the query heads of each KV
// head.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// dout [batch, num_q_heads, head_dim]; dq like dout; dk, dv [batch, num_kv_heads, head_dim].
void attention_backward_single_key(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, int64_t batch,
                                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                   cudaStream_t stream);

}  // namespace moeforge::cuda
