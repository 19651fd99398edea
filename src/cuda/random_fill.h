// Random device data for benchmarks: values uniform in [-sqrt(3) scale, sqrt(3) scale] (standard
// deviation scale) from a counter-based hash of (seed, index), generated on the device, so
// gigabytes of inputs or weights cost no host time. Not for statistics: only for realistic
// operands. The bf16 fill is the fp32 fill of the same seed rounded to nearest even.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

void fill_uniform_bf16(bf16* x, int64_t count, uint64_t seed, float scale, cudaStream_t stream);
void fill_uniform_f32(float* x, int64_t count, uint64_t seed, float scale, cudaStream_t stream);
// x[i] = value.
void fill_constant_f32(float* x, int64_t count, float value, cudaStream_t stream);

}  // namespace moeforge::cuda
