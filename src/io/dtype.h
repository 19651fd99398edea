// Element types of safetensors files (their spelling and sizes) and the conversions between the
// floating ones and fp32/fp64: bf16 and f16 with round-to-nearest-even, NaN kept NaN.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace moeforge::io {

enum class DType {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kI64,
  kU64,
  kF64,
};

// Bytes per element.
size_t dtype_size(DType dtype);
// Safetensors spelling: "BOOL", "U8", "F8_E5M2", "BF16", "F32", ...
std::string dtype_name(DType dtype);
// Inverse of dtype_name; throws moeforge::Error on unknown names, listing the valid ones.
DType parse_dtype(const std::string& name);
// Inverse of dtype_name; nullopt for unknown names.
std::optional<DType> find_dtype(const std::string& name);
// "BOOL, U8, ..., F64", for error messages.
std::string valid_dtype_names();
// F16, BF16, F32, F64: the dtypes convert_to_float / convert_from_float accept.
bool is_convertible_float(DType dtype);

float bf16_to_float(uint16_t bits);
// Round to nearest even; overflow gives inf; NaN stays a (quiet) NaN with the same sign.
uint16_t float_to_bf16(float value);
float half_to_float(uint16_t bits);
// IEEE binary16 with round to nearest even, subnormals, inf and NaN.
uint16_t float_to_half(float value);
// Round to nearest even directly from fp64 (rounding through fp32 first could round twice).
// Overflow gives inf, NaN stays NaN.
uint16_t double_to_bf16(double value);
uint16_t double_to_half(double value);

// n elements of src (little-endian, any alignment) to float / double. Throws for dtypes that are
// not F32/BF16/F16/F64.
void convert_to_float(DType src, const std::byte* in, float* out, size_t n);
void convert_to_double(DType src, const std::byte* in, double* out, size_t n);
// n values to dtype dst (little-endian, any alignment). Same dtypes as above.
void convert_from_float(DType dst, const float* in, std::byte* out, size_t n);
void convert_from_double(DType dst, const double* in, std::byte* out, size_t n);

}  // namespace moeforge::io
