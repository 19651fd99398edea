// The arithmetic of the coverage select's rule (cuda/coverage_select.h) that its kernels share: an
// entry's fp32 bits (its order), its 2^-52 fixed-point value, a segment's limit, the digits in
// which the cut's bits are found, the cut with its step at each pick, and the marks of a tie.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace moeforge::cuda::coverage {

constexpr int kDigitBits = 8;
constexpr int kBuckets = 1 << kDigitBits;
constexpr int kPasses = 32 / kDigitBits;
constexpr double kFixedOne = 4503599627370496.0;  // 2^52

// The fp32 bits without the sign: they order the values >= 0 as the values, -0.0 as +0.0.
template <typename T>
__device__ __forceinline__ uint32_t key_of(T value) {
  return __float_as_uint(static_cast<float>(value)) & 0x7fffffffu;
}

__device__ __forceinline__ unsigned long long fixed_of(uint32_t key) {
  return __double2ull_rn(static_cast<double>(__uint_as_float(key)) * kFixedOne);
}

__device__ __forceinline__ unsigned long long limit_of(unsigned long long total, double gamma) {
  if (gamma >= 1.0) return total;
  return min(total, static_cast<unsigned long long>(gamma * static_cast<double>(total)));
}

// The shift of pass `pass`'s digit: bits [shift, shift + kDigitBits) of the key.
__host__ __device__ constexpr int digit_shift(int pass) {
  return 32 - kDigitBits * (pass + 1);
}

// Whether key shares the bits found before pass `pass` with the cut's bits found so far.
__device__ __forceinline__ bool in_cut_prefix(uint32_t key, uint32_t cut_key, int pass) {
  const int shift = digit_shift(pass) + kDigitBits;
  return pass == 0 || (key >> shift) == (cut_key >> shift);
}

// One segment's cut: the fp32 bits K of its first excluded entry (in the order of
// cuda/coverage_select.h), found kDigitBits at a time.
struct Cut {
  uint32_t key;                    // K's bits found so far (every bit once done)
  uint32_t all;                    // 1: every entry fits under the limit (key unused)
  uint32_t done;                   // 1: the cut is final, later passes skip the segment
  unsigned long long limit;        // T if gamma >= 1, else floor(gamma T)
  unsigned long long sum_above;    // fixed-point sum of the entries above K's current bucket
  unsigned long long count_above;  // their number
  unsigned long long count_equal;  // once done: the entries equal to K (see take_bucket)
  unsigned long long take_equal;   // of those, selected (the first by position)
};

// The pick of pass `pass`: the cut keeps `bucket`, the one where the running sum (from the top
// bucket) passes the limit, whose count entries follow sum_before and count_before of the higher
// buckets. If the bucket holds one entry before the last pass, that entry is the first excluded
// (its value passes the limit) and no other entry shares its bits found so far: the cut is final.
// K becomes the bucket's highest bits, so the entries above K are those of the higher buckets;
// count_equal = 1 with take_equal = 0 leaves the single entry out whether or not its bits equal K.
// After the last pass K is whole, and of the count entries equal to it the first take_equal by
// position are selected.
__device__ __forceinline__ void take_bucket(Cut& cut, uint32_t bucket, int pass,
                                            unsigned long long count, unsigned long long sum_before,
                                            unsigned long long count_before) {
  const int shift = digit_shift(pass);
  cut.key |= bucket << shift;
  cut.sum_above += sum_before;
  cut.count_above += count_before;
  if (count == 1 && pass < kPasses - 1) {
    cut.key |= (1u << shift) - 1;
    cut.count_equal = 1;
    cut.take_equal = 0;
    cut.done = 1;
  } else if (pass == kPasses - 1) {
    cut.count_equal = count;
    cut.take_equal = min(count, (cut.limit - cut.sum_above) / fixed_of(cut.key));
    cut.done = 1;
  }
}

// Whether the final cut falls inside a run of equal values (0 < take_equal < count_equal), so
// that the first take_equal of them by position are to be marked after the others.
__device__ __forceinline__ bool is_tie(const Cut& cut) {
  return cut.all == 0 && cut.take_equal != 0 && cut.take_equal != cut.count_equal;
}

// Whether the entry of `key` is selected by the final cut before the ties are placed: every entry
// where all fit, those above K, and those equal to K where all of them are taken.
__device__ __forceinline__ bool marked(const Cut& cut, uint32_t key) {
  return cut.all != 0 || key > cut.key || (key == cut.key && cut.take_equal == cut.count_equal);
}

// Where the final cut is a tie, marks in out the slice's entries equal to it in position order
// while fewer than take_equal are taken, counting from `taken` equal entries before the slice:
// key_at(i) is the key at position i of [0, len). Called by every thread of a block of kThreads.
template <int kThreads, typename KeyAt>
__device__ void mark_ties(uint8_t* out, int64_t len, unsigned long long taken, const Cut& cut,
                          KeyAt key_at,
                          typename cub::BlockScan<unsigned, kThreads>::TempStorage& storage) {
  for (int64_t base = 0; base < len && taken < cut.take_equal; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const unsigned equal = i < len && key_at(i) == cut.key ? 1u : 0u;
    unsigned position = 0, tile_equal = 0;
    cub::BlockScan<unsigned, kThreads>(storage).ExclusiveSum(equal, position, tile_equal);
    if (equal != 0 && taken + position < cut.take_equal) out[i] = 1;
    taken += tile_equal;
    __syncthreads();  // storage is reused
  }
}

}  // namespace moeforge::cuda::coverage
