// Helpers on one warp's fp32 accumulator fragments in the m16n8 layout, which mma.sync m16n8k16
// and each warp's share of wgmma m64nN both give: float s[4 n + 2 half + j] is row g + 8 half of
// the warp's 16 rows and column 8 n + 2 t + j (g = lane / 4, t = lane % 4). Used by the attention
// kernels and the FlexPrefill fp32 search's passes.
#pragma once

#include <cmath>

namespace moeforge::cuda {

// Sets s to -infinity where the key lies past the row (causal masking of a tile): key_shift is
// the tile's first key position minus the warp's first row position; key 8 n + 2 t + j of row
// g + 8 half stays iff 8 n + j <= g + 8 half - key_shift - 2 t.
template <int kKeyTiles>
__device__ __forceinline__ void mask_keys_past_rows(float (&s)[4 * kKeyTiles], int key_shift, int g,
                                                    int t) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int last = g + 8 * half - key_shift - 2 * t;
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      if (8 * n > last) s[4 * n + 2 * half] = -INFINITY;
      if (8 * n + 1 > last) s[4 * n + 2 * half + 1] = -INFINITY;
    }
  }
}

// One step of column_butterfly: the lanes on either side of bit kMask swap halves of their first
// 2 kWidth columns and each keeps the sum of one half in v[0, kWidth).
template <int kWidth, int kMask>
__device__ __forceinline__ void butterfly_step(float (&v)[16], int lane) {
  const bool upper = (lane & kMask) != 0;
#pragma unroll
  for (int i = 0; i < kWidth; ++i) {
    const float send = upper ? v[i] : v[i + kWidth];
    const float keep = upper ? v[i + kWidth] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kMask);
  }
}

// Column sums of a 64-column tile over the warp's rows: v[2 n + j] holds the lane's part of
// column 8 n + 2 t + j (the sum of its rows' values there). A butterfly over the 8 lanes sharing t
// (xor 16, 8, 4) halves the columns a lane keeps at each step; after it v[0] and v[1] are columns
// 8 g + 2 t and 8 g + 2 t + 1, summed over all of the warp's rows.
__device__ __forceinline__ void column_butterfly(float (&v)[16], int lane) {
  butterfly_step<8, 16>(v, lane);
  butterfly_step<4, 8>(v, lane);
  butterfly_step<2, 4>(v, lane);
}

}  // namespace moeforge::cuda
