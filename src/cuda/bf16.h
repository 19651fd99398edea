// The 16-bit float of the CUDA backend (bf16 activations and weight copies; fp32 accumulation)
// and the host-side conversions the tests and the model use.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

namespace moeforge::cuda {

using bf16 = __nv_bfloat16;

// Round to nearest even, as the device does.
std::vector<bf16> to_bf16(const std::vector<float>& x);
std::vector<float> to_float(const std::vector<bf16>& x);

}  // namespace moeforge::cuda
