// Ulysses sequence parallelism's layout change around attention (megascale-moe.md section 1;
// model/transformer.cpp's exchange_heads is the spec): each rank of a group of n holds `seq`
// positions of every sequence with all heads ("local" [batch, seq, heads, head_dim]) before
// attention and all n * seq positions of its heads / n heads ("heads" [batch, n * seq, heads / n,
// head_dim]) inside it. The exchange is one all-to-all of a buffer [n, chunk]: chunk r holds, for
// each tensor in order, its runs of heads / n * head_dim values per (batch, position), those of
// rank r's heads at this rank's positions (sent) or this rank's heads at rank r's positions
// (received).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/bf16.h"

namespace moeforge::cuda {

struct UlyssesTensor {
  bf16* local;        // [batch, seq, num_heads, head_dim]
  bf16* heads;        // [batch, num_ranks * seq, num_heads / num_ranks, head_dim]
  int64_t num_heads;  // divisible by num_ranks
};

struct UlyssesShape {
  int64_t batch, seq, head_dim, num_ranks;
};

// Elements of one rank's chunk of the buffer: batch * seq * head_dim * sum of num_heads / n.
int64_t ulysses_chunk(const std::vector<UlyssesTensor>& tensors, const UlyssesShape& shape);

// Sequence -> heads, first half: the buffer from the local tensors.
void ulysses_pack_local(bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                        const UlyssesShape& shape, cudaStream_t stream);
// Sequence -> heads, second half: the heads tensors from the received buffer.
void ulysses_unpack_heads(const bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                          const UlyssesShape& shape, cudaStream_t stream);
// Heads -> sequence, first half: the buffer from the heads tensors.
void ulysses_pack_heads(bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                        const UlyssesShape& shape, cudaStream_t stream);
// Heads -> sequence, second half: the local tensors from the received buffer.
void ulysses_unpack_local(const bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                          const UlyssesShape& shape, cudaStream_t stream);

}  // namespace moeforge::cuda
