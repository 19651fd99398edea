// Pinned merge arithmetic. Compiled with -ffp-contract=off (src/CMakeLists.txt) so that
// acc + w * x is a rounded product then a rounded sum on every machine.
#include "merge/merge_kernel.h"

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace moeforge::merge {

static_assert(
    FLT_EVAL_METHOD == 0,
    "the pinned merge arithmetic needs float and double evaluated in their own precision");

namespace {

// fp64 -> fp32 rounding to odd: the value truncated toward zero, its last bit set when inexact.
// Rounding that to nearest even into a format of at most 22 significant bits (BF16: 8, F16: 11)
// gives the same result as rounding the fp64 value there directly.
float round_to_odd_float(double value) {
  const float rounded = static_cast<float>(value);
  if (std::isnan(value) || static_cast<double>(rounded) == value) return rounded;
  // Inexact: step back toward zero if rounding went away from it (one less in the bit pattern is
  // the next smaller magnitude, inf included), then set the last bit.
  const bool away = std::fabs(static_cast<double>(rounded)) > std::fabs(value);
  const uint32_t truncated = std::bit_cast<uint32_t>(rounded) - (away ? 1u : 0u);
  return std::bit_cast<float>(truncated | 1u);
}

template <typename Acc>
void load_block(io::DType in_dtype, const std::byte* in, Acc* out, size_t n) {
  if constexpr (std::is_same_v<Acc, float>) {
    io::convert_to_float(in_dtype, in, out, n);
  } else {
    io::convert_to_double(in_dtype, in, out, n);
  }
}

void store_block(io::DType out_dtype, const float* acc, std::byte* out, size_t n) {
  io::convert_from_float(out_dtype, acc, out, n);
}

void store_block(io::DType out_dtype, const double* acc, std::byte* out, size_t n) {
  switch (out_dtype) {
    case io::DType::kBF16:
      for (size_t j = 0; j < n; ++j) {
        const uint16_t bits = double_to_bf16(acc[j]);
        std::memcpy(out + 2 * j, &bits, 2);
      }
      break;
    case io::DType::kF16:
      for (size_t j = 0; j < n; ++j) {
        const uint16_t bits = double_to_half(acc[j]);
        std::memcpy(out + 2 * j, &bits, 2);
      }
      break;
    default: io::convert_from_double(out_dtype, acc, out, n); break;  // F32, F64: one rounding
  }
}

template <typename Acc>
void merge_typed(std::span<const std::byte* const> inputs, io::DType in_dtype,
                 std::span<const double> weights, io::DType out_dtype, int64_t numel,
                 std::byte* out) {
  std::vector<Acc> w(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) w[i] = static_cast<Acc>(weights[i]);
  const size_t in_size = io::dtype_size(in_dtype);
  const size_t out_size = io::dtype_size(out_dtype);
  Acc acc[kKernelBlockElements];
  Acc x[kKernelBlockElements];
  for (int64_t begin = 0; begin < numel; begin += kKernelBlockElements) {
    const size_t n = static_cast<size_t>(std::min(kKernelBlockElements, numel - begin));
    const size_t in_offset = static_cast<size_t>(begin) * in_size;
    load_block(in_dtype, inputs[0] + in_offset, x, n);
    for (size_t j = 0; j < n; ++j) acc[j] = w[0] * x[j];
    for (size_t input_idx = 1; input_idx < inputs.size(); ++input_idx) {
      load_block(in_dtype, inputs[input_idx] + in_offset, x, n);
      const Acc w_i = w[input_idx];
      for (size_t j = 0; j < n; ++j) acc[j] = acc[j] + w_i * x[j];
    }
    store_block(out_dtype, acc, out + static_cast<size_t>(begin) * out_size, n);
  }
}

}  // namespace

uint16_t double_to_bf16(double value) {
  return io::float_to_bf16(round_to_odd_float(value));
}

uint16_t double_to_half(double value) {
  return io::float_to_half(round_to_odd_float(value));
}

void merge_elements(std::span<const std::byte* const> inputs, io::DType in_dtype,
                    std::span<const double> weights, Accumulate accumulate, io::DType out_dtype,
                    int64_t numel, std::byte* out) {
  MF_CHECK(!inputs.empty() && inputs.size() == weights.size(),
           "merge_elements needs one weight per input and at least one input ({} inputs, {} "
           "weights)",
           inputs.size(), weights.size());
  MF_CHECK(io::is_convertible_float(in_dtype) && io::is_convertible_float(out_dtype),
           "merge_elements averages F32, BF16, F16 and F64 only, got {} -> {}",
           io::dtype_name(in_dtype), io::dtype_name(out_dtype));
  if (accumulate == Accumulate::kFp64) {
    merge_typed<double>(inputs, in_dtype, weights, out_dtype, numel, out);
  } else {
    merge_typed<float>(inputs, in_dtype, weights, out_dtype, numel, out);
  }
}

}  // namespace moeforge::merge
