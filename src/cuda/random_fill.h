// Random device data for benchmarks: bf16 values uniform in [-sqrt(3) scale, sqrt(3) scale] (unit
// variance for scale 1) from a counter-based hash of (seed, index), generated on the device, so
// gigabytes of inputs cost no host time. Not for statistics: only for realistic operands.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

void fill_uniform_bf16(bf16* x, int64_t count, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace moeforge::cuda
