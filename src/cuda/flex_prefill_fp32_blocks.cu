// Step 8's logits in the fp32 FlexPrefill search (cuda/flex_prefill_fp32.h, 8): for the
// query-aware heads, the block means of scale * q in fp32 (a block of threads per query block
// reads whole rows of q, 16 bytes a thread, so the only full read of q in the search runs at copy
// speed) and their dot products with the key blocks' means (the exact doubles, rounded to fp32) by
// fp32 FMA on 64 x 64 tiles.
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
constexpr int kLogitThreads = 256;                    // 16 x 16 threads, 4 x 4 logits each
constexpr int kLoadSteps = kLogitThreads / kTile;     // 4-wide groups a pass covers
constexpr int kSliceLoads = kDepth / 4 / kLoadSteps;  // groups per thread and slice
static_assert(kSliceLoads * kLoadSteps * 4 == kDepth, "a slice is whole 4-wide groups");

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

// One head_dim slice of a logits tile in registers: thread t loads, for tile rows x = t % 64 and
// slice columns 4 (t / 64 + 4 i) .. + 3 (i < kSliceLoads), 4 floats of q_means and 4 doubles of
// k_means (head_dim % 8 == 0, so a group of 4 is wholly inside or outside head_dim).
struct LogitSlice {
  float4 q[kSliceLoads];
  double2 k[kSliceLoads][2];

  __device__ void load(const float* q_head, const double* k_head, int64_t r0, int64_t c0,
                       int64_t d0, const SearchShape& s, int tid) {
    const int x = tid % kTile;
#pragma unroll
    for (int i = 0; i < kSliceLoads; ++i) {
      const int64_t d = d0 + 4 * (tid / kTile + kLoadSteps * i);
      const bool q_in = d < s.head_dim && r0 + x < s.num_blocks;
      const bool k_in = d < s.head_dim && c0 + x < s.num_blocks;
      q[i] = q_in ? *reinterpret_cast<const float4*>(q_head + (r0 + x) * s.head_dim + d)
                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const double2* kp = reinterpret_cast<const double2*>(k_head + (c0 + x) * s.head_dim + d);
      k[i][0] = k_in ? kp[0] : make_double2(0.0, 0.0);
      k[i][1] = k_in ? kp[1] : make_double2(0.0, 0.0);
    }
  }

  // Into q_tile / k_tile [kDepth][kTileStride] (transposed: depth-major), k rounded to fp32.
  __device__ void store(float (*q_tile)[kTileStride], float (*k_tile)[kTileStride], int tid) const {
    const int x = tid % kTile;
#pragma unroll
    for (int i = 0; i < kSliceLoads; ++i) {
      const int dd = 4 * (tid / kTile + kLoadSteps * i);
      q_tile[dd][x] = q[i].x;
      q_tile[dd + 1][x] = q[i].y;
      q_tile[dd + 2][x] = q[i].z;
      q_tile[dd + 3][x] = q[i].w;
      k_tile[dd][x] = static_cast<float>(k[i][0].x);
      k_tile[dd + 1][x] = static_cast<float>(k[i][0].y);
      k_tile[dd + 2][x] = static_cast<float>(k[i][1].x);
      k_tile[dd + 3][x] = static_cast<float>(k[i][1].y);
    }
  }
};

// tri [Hq, nb (nb + 1) / 2] gets, for c <= r at triangle position r (r + 1) / 2 + c, the fp32
// FMA chain over d ascending of q_means[h, r, d] * fp32(k_means[h / group, c, d]). Block (column
// tile, row tile, head); thread (tx, ty) owns rows 4 ty + i and columns 4 tx + j of the tile. The
// next head_dim slice is loaded into registers while the current one is multiplied.
__global__ void __launch_bounds__(kLogitThreads)
    block_logits_kernel(double* tri, const float* q_means, const double* k_means,
                        const int32_t* query_aware, SearchShape s) {
  __shared__ __align__(16) float q_tile[kDepth][kTileStride];
  __shared__ __align__(16) float k_tile[kDepth][kTileStride];
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
  LogitSlice slice;
  slice.load(q_head, k_head, r0, c0, 0, s, tid);
  for (int64_t d0 = 0; d0 < s.head_dim; d0 += kDepth) {
    slice.store(q_tile, k_tile, tid);
    __syncthreads();
    if (d0 + kDepth < s.head_dim) slice.load(q_head, k_head, r0, c0, d0 + kDepth, s, tid);
#pragma unroll 16
    for (int dd = 0; dd < kDepth; ++dd) {
      float a[4], b[4];
      load_vec(a, &q_tile[dd][4 * ty]);
      load_vec(b, &k_tile[dd][4 * tx]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  double* head_tri = tri + h * (nb * (nb + 1) / 2);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + 4 * ty + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + 4 * tx + j;
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
