// Dtype names and sizes, and the bf16/f16/f32/f64 conversions used to load and save weights.
#include "io/dtype.h"

#include "core/error.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>

namespace moeforge::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; big-endian hosts are not supported");

namespace {

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr std::array<DTypeEntry, 15> kDTypes = {{
    {DType::kBool, "BOOL", 1},
    {DType::kU8, "U8", 1},
    {DType::kI8, "I8", 1},
    {DType::kF8E5M2, "F8_E5M2", 1},
    {DType::kF8E4M3, "F8_E4M3", 1},
    {DType::kI16, "I16", 2},
    {DType::kU16, "U16", 2},
    {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},
    {DType::kI32, "I32", 4},
    {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},
    {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},
    {DType::kF64, "F64", 8},
}};

const DTypeEntry& entry(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  MF_FAIL("invalid DType value {}", static_cast<int>(dtype));
}

template <typename T>
T load(const std::byte* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

template <typename T>
void store(std::byte* p, T value) {
  std::memcpy(p, &value, sizeof(T));
}

void check_convertible(DType dtype, const char* direction) {
  MF_CHECK(is_convertible_float(dtype),
           "cannot convert {} {} floating point: only F32, BF16, F16 and F64 are supported",
           dtype_name(dtype), direction);
}

// Converts n elements of dtype src to Out (exact when Out is double).
template <typename Out>
void convert_to(DType src, const std::byte* in, Out* out, size_t n) {
  check_convertible(src, "to");
  switch (src) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(load<float>(in + 4 * i));
      break;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(load<double>(in + 8 * i));
      break;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(load<uint16_t>(in + 2 * i));
      break;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) out[i] = half_to_float(load<uint16_t>(in + 2 * i));
      break;
    default: MF_FAIL("unreachable dtype {}", dtype_name(src));
  }
}

// F16 and BF16 round through float, so a double input is rounded twice.
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

// One rounding into bf16 / f16 from float or double.
uint16_t to_bf16(float value) {
  return float_to_bf16(value);
}
uint16_t to_bf16(double value) {
  return float_to_bf16(round_to_odd_float(value));
}
uint16_t to_half(float value) {
  return float_to_half(value);
}
uint16_t to_half(double value) {
  return float_to_half(round_to_odd_float(value));
}

template <typename In>
void convert_from(DType dst, const In* in, std::byte* out, size_t n) {
  check_convertible(dst, "from");
  switch (dst) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) store(out + 4 * i, static_cast<float>(in[i]));
      break;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) store(out + 8 * i, static_cast<double>(in[i]));
      break;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) store(out + 2 * i, to_bf16(in[i]));
      break;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) store(out + 2 * i, to_half(in[i]));
      break;
    default: MF_FAIL("unreachable dtype {}", dtype_name(dst));
  }
}

}  // namespace

size_t dtype_size(DType dtype) {
  return entry(dtype).size;
}

std::string dtype_name(DType dtype) {
  return entry(dtype).name;
}

std::optional<DType> find_dtype(const std::string& name) {
  for (const DTypeEntry& e : kDTypes) {
    if (name == e.name) return e.dtype;
  }
  return std::nullopt;
}

std::string valid_dtype_names() {
  std::string names;
  for (const DTypeEntry& e : kDTypes) {
    names += names.empty() ? "" : ", ";
    names += e.name;
  }
  return names;
}

DType parse_dtype(const std::string& name) {
  const std::optional<DType> dtype = find_dtype(name);
  MF_CHECK(dtype.has_value(), "unknown dtype '{}'; valid dtypes: {}", name, valid_dtype_names());
  return *dtype;
}

bool is_convertible_float(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16 ||
         dtype == DType::kF64;
}

float bf16_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t float_to_bf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) {
    // Keep sign and the top of the payload; set the quiet bit so the payload cannot become zero.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

float half_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_half(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {
    return static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  }
  // 65520 = 0x477FF000 is halfway between the largest half (65504) and 2^16; ties go to even,
  // which is the overflow to inf.
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (magnitude < 0x38800000u) {
    // Below the smallest normal half (2^-14): the result is round(|value| * 2^24) subnormal units
    // (a carry into 0x400 correctly gives the smallest normal).
    const uint32_t float_exponent = magnitude >> 23;
    if (float_exponent < 102) return sign;  // |value| < 2^-25: rounds to zero
    const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - float_exponent;  // 14..24
    uint32_t quotient = significand >> shift;
    const uint32_t remainder = significand & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (quotient & 1u))) ++quotient;
    return static_cast<uint16_t>(sign | quotient);
  }
  const uint32_t rebased = magnitude - (112u << 23);
  const uint32_t rounding_bias = 0xFFFu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rebased + rounding_bias) >> 13));
}

void convert_to_float(DType src, const std::byte* in, float* out, size_t n) {
  convert_to(src, in, out, n);
}

void convert_to_double(DType src, const std::byte* in, double* out, size_t n) {
  convert_to(src, in, out, n);
}

void convert_from_float(DType dst, const float* in, std::byte* out, size_t n) {
  convert_from(dst, in, out, n);
}

uint16_t double_to_bf16(double value) {
  return to_bf16(value);
}

uint16_t double_to_half(double value) {
  return to_half(value);
}

void convert_from_double(DType dst, const double* in, std::byte* out, size_t n) {
  convert_from(dst, in, out, n);
}

}  // namespace moeforge::io
