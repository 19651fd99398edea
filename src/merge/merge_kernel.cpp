// Pinned merge arithmetic. Compiled with -ffp-contract=off (src/CMakeLists.txt) so that
// acc + w * x is a rounded product then a rounded sum on every machine.
#include "merge/merge_kernel.h"

#include <cfloat>
#include <vector>

#include "core/error.h"

namespace moeforge::merge {

static_assert(
    FLT_EVAL_METHOD == 0,
    "the pinned merge arithmetic needs float and double evaluated in their own precision");

namespace {

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
  io::convert_from_double(out_dtype, acc, out, n);  // one rounding into every output dtype
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
