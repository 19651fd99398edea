// Token embedding on the GPU (ops/embedding.h is the spec).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace moeforge::cuda {

// out [n, hidden] (fp32 residual stream) = table[tokens[i]] (fp32 master weights).
void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t n,
                       int64_t hidden, cudaStream_t stream);

// The positions of each distinct token, grouped (a counting sort done on the host, where the
// tokens come from): token_ids [num_unique], offsets [num_unique + 1], positions [n] ascending
// within each token. Makes the backward deterministic without atomics.
struct TokenGroups {
  std::vector<int32_t> token_ids, offsets, positions;
};
TokenGroups group_tokens(const int32_t* tokens, int64_t n);
// Pads groups to num_groups (>= its groups) with empty groups of token 0 at the end, so that the
// device arrays keep one size (n) whatever the batch's distinct tokens.
void pad_token_groups(TokenGroups& groups, size_t num_groups);

// dtable[token] += sum of dout rows at its positions, in position order. The device arrays hold
// a TokenGroups of num_groups groups, possibly padded with empty groups (equal offsets), which
// change nothing: a caller may launch a fixed count (pad_token_groups).
void embedding_backward(float* dtable, const float* dout, const int32_t* token_ids,
                        const int32_t* offsets, const int32_t* positions, int64_t num_groups,
                        int64_t hidden, cudaStream_t stream);

}  // namespace moeforge::cuda
