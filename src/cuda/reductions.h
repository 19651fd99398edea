// Deterministic reductions and small elementwise helpers of the CUDA backend: fixed-order
// partial sums (results do not depend on scheduling), column sums for bias gradients, casts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// Doubles of scratch that sum_squares and sum need for count elements.
int64_t reduction_scratch_doubles(int64_t count);
// *out (device double) = sum of x[i]^2, accumulated in double in a fixed order.
void sum_squares(double* out, const float* x, int64_t count, double* scratch, cudaStream_t stream);
// *out (device double) = sum of x[i], in double in a fixed order.
void sum(double* out, const float* x, int64_t count, double* scratch, cudaStream_t stream);

// out [c] += sum over chunks of partial [num_chunks, c], in chunk order (the second stage of the
// fixed-order column sums of weight gradients).
void accumulate_chunk_sums(float* out, const float* partial, int64_t num_chunks, int64_t c,
                           cudaStream_t stream);

// dbias [c] += sum over rows of dy [n, c] (fp32 accumulation, fixed order).
void column_sum_accumulate(float* dbias, const bf16* dy, int64_t n, int64_t c, cudaStream_t stream);

// y [n, c] += bias [c] (fp32 math, bf16 result).
void add_bias(bf16* y, const float* bias, int64_t n, int64_t c, cudaStream_t stream);
// out[i] = bf16(x[i]) (round to nearest even).
void cast_to_bf16(bf16* out, const float* x, int64_t count, cudaStream_t stream);
// out[i] = float(x[i]).
void cast_to_float(float* out, const bf16* x, int64_t count, cudaStream_t stream);
// x[i] *= factor.
void scale_inplace(float* x, float factor, int64_t count, cudaStream_t stream);
// y[i] += x[i].
void add_inplace(float* y, const float* x, int64_t count, cudaStream_t stream);

}  // namespace moeforge::cuda
