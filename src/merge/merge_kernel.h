// The per-element pinned arithmetic of merging (merge.h): weighted sums in a fixed order without
// fused multiply-add, and the rounding of the accumulator into the output dtype.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "io/dtype.h"
#include "merge/merge.h"

namespace moeforge::merge {

// Elements converted and accumulated at a time (stack scratch of merge_elements).
inline constexpr int64_t kKernelBlockElements = 2048;

// For j in [0, numel): out[j] = round(out_dtype, acc) with acc = fl(w_1 x_1[j]), then
// acc = fl(acc + fl(w_i x_i[j])) for i = 2..N, in fp32 (weights rounded once from fp64) or fp64.
// inputs[i] points at numel elements of in_dtype (F32, BF16, F16 or F64; any alignment); out at
// numel elements of out_dtype (the same four). weights.size() == inputs.size() >= 1.
void merge_elements(std::span<const std::byte* const> inputs, io::DType in_dtype,
                    std::span<const double> weights, Accumulate accumulate, io::DType out_dtype,
                    int64_t numel, std::byte* out);

}  // namespace moeforge::merge
