// TMA descriptors (CUtensorMap) for the Hopper kernels: a row-major bf16 matrix read in boxes of
// kPanel columns with the 128-byte swizzle that wgmma's shared-memory descriptors expect
// (cuda/hopper_util.cuh).
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

constexpr int kPanel = 64;  // elements of a 128-byte swizzled row: one TMA box's width

// A TMA descriptor of a row-major bf16 [rows, columns] tensor read in boxes of kPanel columns x
// box_rows rows with the 128-byte swizzle; rows past the end read as zeros. Throws moeforge::Error
// when the driver lacks TMA or rejects the shape.
CUtensorMap bf16_tensor_map(const bf16* base, int64_t rows, int64_t columns, int box_rows);

}  // namespace moeforge::cuda
