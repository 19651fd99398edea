// Values and layouts shared by the multi-rank communicator tests (MPI and NCCL): bf16 bit
// patterns, uneven all-to-all-v counts with gapped offsets, and the message of a thrown Error.
#pragma once

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace moeforge::testing {

// The bf16 bits of value, which must be a bf16 value (its low 16 bits zero).
inline uint16_t bf16_bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  EXPECT_EQ(bits & 0xFFFFu, 0u) << value << " is not a bf16 value";
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_value(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// Rank src sends (src + 2 * dst) % 3 elements to rank dst: uneven, and zero for some pairs.
inline size_t uneven_count(int src_idx, int dst_idx) {
  return static_cast<size_t>(src_idx + 2 * dst_idx) % 3;
}

// Chunks laid out in reverse peer order with a one-element gap after each.
inline std::vector<size_t> reversed_offsets_with_gaps(const std::vector<size_t>& counts,
                                                      size_t* extent) {
  std::vector<size_t> offsets(counts.size());
  size_t next_offset = 0;
  for (size_t peer_idx = counts.size(); peer_idx-- > 0;) {
    offsets[peer_idx] = next_offset;
    next_offset += counts[peer_idx] + 1;
  }
  *extent = next_offset;
  return offsets;
}

// What call throws as a moeforge::Error, or "(nothing thrown)".
inline std::string thrown_message(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& error) {
    return error.what();
  }
  return "(nothing thrown)";
}

}  // namespace moeforge::testing
