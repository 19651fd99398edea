// Step 8's logits in the fp32 FlexPrefill search (cuda/flex_prefill_fp32.h, 8): for the
// query-aware heads, the block means of scale * q in fp32 (a block of threads per query block
// reads whole rows of q, 16 bytes a thread, so the only full read of q in the search runs at copy
// speed) and their dot products with the key blocks' means (the exact doubles, rounded to fp32) by
// fp32 FMA on 64 x 64 tiles of shared memory.
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

using flex::SearchShape;

constexpr int kChunkElems = 8;     // bf16 per 16-byte load
constexpr int kMeanThreads = 256;  // chunks of a row per block of threads
constexpr int kRowUnroll = 4;      // rows loaded ahead
constexpr int kTile = 64;          // logits: a kTile x kTile tile of the triangle per block
constexpr int kDepth = 64;         // head_dim slice per shared-memory tile
constexpr int kTileStride = kTile + 4;
constexpr int kLogitThreads = 256;  // 16 x 16 threads, 4 x 4 logits each
static_assert(kLogitThreads % (kDepth / 2) == 0 && kDepth % 8 == 0,
              "slice loads cover whole rows with whole 4-wide groups");

// means [Hq, nb, D]: block b's rows of q[:, h, d] summed in fp32, ascending, times
// fp32(scale / length); heads whose flag in active is 0 are skipped (active null: none). Block
// (query block b, group of kMeanThreads 8-element chunks of a row [Hq * D]).
__global__ void __launch_bounds__(kMeanThreads)
    q_block_means_kernel(float* means, const bf16* q, const int32_t* active, SearchShape s) {
  const int64_t row_chunks = s.num_q_heads * s.head_dim / kChunkElems;
  const int64_t chunk = static_cast<int64_t>(blockIdx.y) * kMeanThreads + threadIdx.x;
  if (chunk >= row_chunks) return;
  const int64_t h = chunk * kChunkElems / s.head_dim;
  if (active != nullptr && active[h] == 0) return;
  const int64_t b = blockIdx.x;
  const int64_t begin = b * s.block_size;
  const int64_t end = min(s.seq_len, begin + s.block_size);
  const bf16* src = q + chunk * kChunkElems;
  const int64_t row_elems = s.num_q_heads * s.head_dim;
  float acc[kChunkElems] = {};
  int64_t j = begin;
  for (; j + kRowUnroll <= end; j += kRowUnroll) {
    float x[kRowUnroll][kChunkElems];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) load_vec(x[u], src + (j + u) * row_elems);
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u)
#pragma unroll
      for (int i = 0; i < kChunkElems; ++i) acc[i] += x[u][i];
  }
  for (; j < end; ++j) {
    float x[kChunkElems];
    load_vec(x, src + j * row_elems);
#pragma unroll
    for (int i = 0; i < kChunkElems; ++i) acc[i] += x[i];
  }
  const float factor = static_cast<float>(s.scale / static_cast<double>(end - begin));
#pragma unroll
  for (int i = 0; i < kChunkElems; ++i) acc[i] *= factor;
  store_vec(means + (h * s.num_blocks + b) * s.head_dim + (chunk * kChunkElems - h * s.head_dim),
            acc);
}

// 16 bytes of a slice as fp32 into a tile row: q's float4 as it is, k's double2 rounded.
__device__ __forceinline__ void store_as_float(float* dst, float4 v) {
  *reinterpret_cast<float4*>(dst) = v;
}
__device__ __forceinline__ void store_as_float(float* dst, double2 v) {
  *reinterpret_cast<float2*>(dst) = make_float2(static_cast<float>(v.x), static_cast<float>(v.y));
}

// Rows [row0, row0 + kTile) and head_dim slice [d0, d0 + kDepth) of a [nb, D] matrix of means
// into tile [kTile rows][kTileStride] (row-major, fp32), 16 bytes (a Vec) a lane: consecutive
// lanes read consecutive d of one row, so that every load is coalesced. head_dim % 8 == 0, so a
// Vec is wholly inside or outside head_dim; rows past nb and d past head_dim read as zeros.
template <typename Vec, typename T>
__device__ void load_slice_rows(float (*tile)[kTileStride], const T* head, int64_t row0, int64_t d0,
                                const SearchShape& s, int tid) {
  constexpr int kLanes = kDepth / static_cast<int>(sizeof(Vec) / sizeof(T));  // lanes a row
  const int dd = (kDepth / kLanes) * (tid % kLanes);
  const bool d_in = d0 + dd < s.head_dim;
  for (int x = tid / kLanes; x < kTile; x += kLogitThreads / kLanes) {
    Vec v{};
    if (d_in && row0 + x < s.num_blocks) {
      v = *reinterpret_cast<const Vec*>(head + (row0 + x) * s.head_dim + d0 + dd);
    }
    store_as_float(&tile[x][dd], v);
  }
}

// tri [Hq, nb (nb + 1) / 2] gets, for c <= r at triangle position r (r + 1) / 2 + c, the fp32
// FMA chain over d ascending of q_means[h, r, d] * fp32(k_means[h / group, c, d]). Block (column
// tile, row tile, head); thread (tx, ty) owns rows ty + 16 i and columns tx + 16 j of the tile, so
// that a quarter warp's float4 reads of k_tile fall in distinct banks (kTileStride = kTile + 4),
// its reads of q_tile are broadcasts, and a half warp's stores of a row are contiguous.
__global__ void __launch_bounds__(kLogitThreads)
    block_logits_kernel(double* tri, const float* q_means, const double* k_means,
                        const int32_t* query_aware, SearchShape s) {
  __shared__ __align__(16) float q_tile[kTile][kTileStride];
  __shared__ __align__(16) float k_tile[kTile][kTileStride];
  const int64_t h = blockIdx.z;
  const int64_t nb = s.num_blocks;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (query_aware[h] == 0 || c0 > r0 + kTile - 1) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const float* q_head = q_means + h * nb * s.head_dim;
  const double* k_head = k_means + (h / s.group_size) * nb * s.head_dim;
  float acc[4][4] = {};
  for (int64_t d0 = 0; d0 < s.head_dim; d0 += kDepth) {
    load_slice_rows<float4>(q_tile, q_head, r0, d0, s, tid);
    load_slice_rows<double2>(k_tile, k_head, c0, d0, s, tid);
    __syncthreads();
#pragma unroll 4
    for (int dd = 0; dd < kDepth; dd += 4) {
      float a[4][4], b[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        load_vec(a[i], &q_tile[ty + 16 * i][dd]);
        load_vec(b[i], &k_tile[tx + 16 * i][dd]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i][e], b[j][e], acc[i][j]);
    }
    __syncthreads();
  }
  double* head_tri = tri + h * (nb * (nb + 1) / 2);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (r < nb && c <= r) head_tri[r * (r + 1) / 2 + c] = static_cast<double>(acc[i][j]);
    }
  }
}

}  // namespace

void fp32_q_block_means(float* q_means, const bf16* q, const int32_t* active,
                        const flex::SearchShape& s, cudaStream_t stream) {
  const int64_t row_chunks = s.num_q_heads * s.head_dim / kChunkElems;
  q_block_means_kernel<<<dim3(static_cast<unsigned>(s.num_blocks),
                              static_cast<unsigned>(ceil_div(row_chunks, kMeanThreads))),
                         kMeanThreads, 0, stream>>>(q_means, q, active, s);
  MF_CUDA_CHECK_LAUNCH();
}

void fp32_block_logits(double* tri, const float* q_means, const double* k_means,
                       const int32_t* query_aware, const flex::SearchShape& s,
                       cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>(ceil_div(s.num_blocks, kTile));
  block_logits_kernel<<<dim3(tiles, tiles, static_cast<unsigned>(s.num_q_heads)), kLogitThreads, 0,
                        stream>>>(tri, q_means, k_means, query_aware, s);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
