// Tensor parallelism's local pieces on the GPU (model/tensor_parallel.h is the spec): the column
// slices of weights and their gradients (pack_columns, add_packed_columns: the same names and
// contracts as the CPU's), and the reorder between a collective's rank order and the sequence
// order that all_gather_sequences and reduce_scatter_sequences do around their collectives (the
// collectives themselves run through the group's Communicator, in GpuTransformer).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/bf16.h"
#include "model/tensor_parallel.h"

namespace moeforge::cuda {

// packed [rows, width] (assign) = matrix[:, begin : begin + width] (bf16 weights; a strided copy
// on stream). Throws moeforge::Error for a slice outside the matrix.
void pack_columns(bf16* packed, const bf16* matrix, const ColumnSlice& slice, cudaStream_t stream);

// matrix[:, begin : begin + width] += packed [rows, width] (fp32 gradients, one fp32 add per
// element). Throws moeforge::Error for a slice outside the matrix.
void add_packed_columns(float* matrix, const float* packed, const ColumnSlice& slice,
                        cudaStream_t stream);

// The two orders of a group's tokens, with elements of elem_bytes bytes: rank order
// [num_ranks, batch, seq, width] (what an all-gather of every rank's [batch, seq, width] returns,
// and what a reduce-scatter gives rank r chunk r of) and sequence order [batch, num_ranks * seq,
// width] (rank r's positions at [r * seq, (r + 1) * seq) of each sequence). Assign the other side;
// the buffers must not overlap. num_ranks strided copies on stream.
void rank_order_to_sequences(void* sequences, const void* ranks, int64_t batch, int64_t seq,
                             int64_t width, int64_t num_ranks, size_t elem_bytes,
                             cudaStream_t stream);
void sequences_to_rank_order(void* ranks, const void* sequences, int64_t batch, int64_t seq,
                             int64_t width, int64_t num_ranks, size_t elem_bytes,
                             cudaStream_t stream);

}  // namespace moeforge::cuda
