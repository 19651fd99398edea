// Values and layouts shared by the multi-rank communicator tests (MPI and NCCL): bf16 bit
// patterns, uneven all-to-all-v counts with gapped offsets, the members of an even/odd split, and
// the message of a thrown Error.
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

// The counts and offsets (in elements) of an all_to_all_v exchange of rank_idx with uneven_count
// chunks laid out by reversed_offsets_with_gaps, and the extents of its send and recv buffers.
struct UnevenExchange {
  std::vector<size_t> send_counts, recv_counts, send_offsets, recv_offsets;
  size_t send_extent = 0, recv_extent = 0;
};

inline UnevenExchange uneven_exchange(int num_ranks, int rank_idx) {
  UnevenExchange x;
  for (int peer_idx = 0; peer_idx < num_ranks; ++peer_idx) {
    x.send_counts.push_back(uneven_count(rank_idx, peer_idx));
    x.recv_counts.push_back(uneven_count(peer_idx, rank_idx));
  }
  x.send_offsets = reversed_offsets_with_gaps(x.send_counts, &x.send_extent);
  x.recv_offsets = reversed_offsets_with_gaps(x.recv_counts, &x.recv_extent);
  return x;
}

// The world ranks of the group of color after split(color, -rank): descending world rank order.
inline std::vector<int32_t> descending_members(int num_ranks, int color) {
  std::vector<int32_t> members;
  for (int member = num_ranks - 1; member >= 0; --member) {
    if (member % 2 == color) members.push_back(member);
  }
  return members;
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
