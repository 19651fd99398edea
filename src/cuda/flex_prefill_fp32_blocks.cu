// The block means of the fp32 FlexPrefill search (cuda/flex_prefill_fp32.h) and step 8's logits:
//  - the key blocks' means (the exact doubles of flex::block_means) and the query blocks' means of
//    scale * q in fp32 run on the side stream beside the tensor-core passes (cuda/side_stream.h):
//    at most kSideBlocksPerSm blocks of kMeanThreads threads per SM in a grid-stride loop over (row
//    block, group of 8-element chunks of a row), each thread with kMeanRows 16-byte loads in flight
//    and at most 80 registers, so that a block fits an SM beside the passes' blocks of threads and
//    still keeps many bytes in flight (Q, the only full read of q in the search, 256 MB at 32K with
//    32 heads, in 69 us alone under ncu);
//  - the logits: the query means dotted with the key means (rounded to fp32) by fp32 FMA on 64 x 64
//    tiles of shared memory (the tiles in a grid-stride loop, so that the side stream can bound
//    the grid), and their row softmax in fp32 (a warp a row; the sums in double); the fast search
//    runs both for every head on the side stream, after the means.
#include <cstdint>
#include <type_traits>

#include "cuda/cuda_check.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

using flex::SearchShape;

constexpr int kChunkElems = 8;     // bf16 per 16-byte load
constexpr int kMeanThreads = 128;  // chunks of a row per block of threads
constexpr int kMeanRows = 8;       // rows loaded ahead
// 65536 / (kMeanMinBlocks * kMeanThreads) = 85 registers at most (80 in the allocator's steps of
// 8).
constexpr int kMeanMinBlocks = 6;
constexpr int kTile = 64;   // logits: a kTile x kTile tile of the triangle per block
constexpr int kDepth = 64;  // head_dim slice per shared-memory tile
constexpr int kTileStride = kTile + 4;
constexpr int kLogitThreads = 256;    // 16 x 16 threads, 4 x 4 logits each
constexpr int kSoftmaxThreads = 256;  // a warp a row
static_assert(kLogitThreads % (kDepth / 2) == 0 && kDepth % 8 == 0,
              "slice loads cover whole rows with whole 4-wide groups");

// The 8 bf16 of a 16-byte load as fp32.
__device__ __forceinline__ void unpack(float (&f)[kChunkElems], uint4 raw) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// Block means of x [N, num_heads * D] per head, block and d, rows summed ascending: kQuery false,
// means (double) = flex::block_means' doubles with factor 1 (the sum in double, times 1 / length);
// kQuery true, means (float) = the rows summed in fp32 times fp32(scale / length) (x is q), for
// heads whose flag in active is set (active null: every head). Work item (row block b, group g of
// kMeanThreads chunks of a row), groups_per_row of them a block; the blocks of threads take items
// in a grid-stride loop.
template <bool kQuery>
__global__ void __launch_bounds__(kMeanThreads, kMeanMinBlocks)
    block_means_kernel(std::conditional_t<kQuery, float, double>* means, const bf16* x,
                       const int32_t* active, int64_t num_heads, SearchShape s,
                       int64_t groups_per_row) {
  using Acc = std::conditional_t<kQuery, float, double>;
  const int64_t row_chunks = num_heads * s.head_dim / kChunkElems;
  for (int64_t item = blockIdx.x; item < s.num_blocks * groups_per_row; item += gridDim.x) {
    const int64_t b = item / groups_per_row;
    const int64_t chunk = (item % groups_per_row) * kMeanThreads + threadIdx.x;
    if (chunk >= row_chunks) continue;
    const int64_t h = chunk * kChunkElems / s.head_dim;
    if (active != nullptr && active[h] == 0) continue;
    const int64_t begin = b * s.block_size;
    const int64_t end = min(s.seq_len, begin + s.block_size);
    const uint4* src = reinterpret_cast<const uint4*>(x) + chunk;
    Acc acc[kChunkElems] = {};
    const auto add_row = [&](uint4 raw) {
      float v[kChunkElems];
      unpack(v, raw);
#pragma unroll
      for (int i = 0; i < kChunkElems; ++i) {
        if constexpr (kQuery) {
          acc[i] += v[i];
        } else {
          acc[i] = __dadd_rn(acc[i], static_cast<double>(v[i]));
        }
      }
    };
    int64_t j = begin;
    for (; j + kMeanRows <= end; j += kMeanRows) {
      uint4 raw[kMeanRows];
#pragma unroll
      for (int u = 0; u < kMeanRows; ++u) raw[u] = __ldg(src + (j + u) * row_chunks);
#pragma unroll
      for (int u = 0; u < kMeanRows; ++u) add_row(raw[u]);
    }
    for (; j < end; ++j) add_row(__ldg(src + j * row_chunks));
    Acc* dst = means + (h * s.num_blocks + b) * s.head_dim + (chunk * kChunkElems - h * s.head_dim);
    const double length = static_cast<double>(end - begin);
    if constexpr (kQuery) {
      const float factor = static_cast<float>(s.scale / length);
#pragma unroll
      for (int i = 0; i < kChunkElems; ++i) acc[i] *= factor;
      store_vec(dst, acc);
    } else {
      const double factor = 1.0 / length;
#pragma unroll
      for (int i = 0; i < kChunkElems; ++i) dst[i] = __dmul_rn(acc[i], factor);
    }
  }
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
// FMA chain over d ascending of q_means[h, r, d] * fp32(k_means[h / group, c, d]), for heads whose
// flag in query_aware is set (null: every head). Work item (head, tile of the triangle: row tile R,
// column tile C <= R, in order of R (R + 1) / 2 + C), taken by the blocks of threads in a
// grid-stride loop; thread (tx, ty) owns rows ty + 16 i and columns tx + 16 j of the tile, so that
// a quarter warp's float4 reads of k_tile fall in distinct banks (kTileStride = kTile + 4), its
// reads of q_tile are broadcasts, and a half warp's stores of a row are contiguous.
__global__ void __launch_bounds__(kLogitThreads)
    block_logits_kernel(float* tri, const float* q_means, const double* k_means,
                        const int32_t* query_aware, SearchShape s, int64_t tiles_per_head) {
  __shared__ __align__(16) float q_tile[kTile][kTileStride];
  __shared__ __align__(16) float k_tile[kTile][kTileStride];
  const int64_t nb = s.num_blocks;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  for (int64_t item = blockIdx.x; item < s.num_q_heads * tiles_per_head; item += gridDim.x) {
    const int64_t h = item / tiles_per_head;
    if (query_aware != nullptr && query_aware[h] == 0) continue;
    const int64_t t = item % tiles_per_head;
    const int64_t row_tile = triangle_row(t);
    const int64_t r0 = row_tile * kTile;
    const int64_t c0 = (t - row_tile * (row_tile + 1) / 2) * kTile;
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
      __syncthreads();  // the tiles are read before the next slice or item overwrites them
    }
    float* head_tri = tri + h * (nb * (nb + 1) / 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = r0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + tx + 16 * j;
        if (r < nb && c <= r) head_tri[r * (r + 1) / 2 + c] = acc[i][j];
      }
    }
  }
}

// Step 8's row softmax of the fp32 logits in tri, in place: a warp a row (rows in a grid-stride
// loop), the row's max, e = expf(x - max) in fp32, the sum of the e in double (each lane its
// entries in order, then a butterfly: the same order in every run), and p = fp32(e * (1 / sum))
// with the reciprocal and the product in double; each e is computed again for its quotient (the
// same value), so the row needs no storage. Rows of heads whose flag in query_aware is 0 keep what
// they held (query_aware null: every head's rows change).
__global__ void __launch_bounds__(kSoftmaxThreads)
    block_softmax_kernel(float* tri, const int32_t* query_aware, int64_t num_heads, int64_t nb) {
  constexpr int kWarps = kSoftmaxThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t num_rows = num_heads * nb;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
       w < num_rows; w += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t h = w / nb, r = w % nb;
    if (query_aware != nullptr && query_aware[h] == 0) continue;
    float* row = tri + h * (nb * (nb + 1) / 2) + r * (r + 1) / 2;
    float max_logit = -INFINITY;
    for (int64_t c = lane; c <= r; c += kWarpSize) max_logit = fmaxf(max_logit, row[c]);
    max_logit = warp_max(max_logit);
    double sum = 0.0;
    for (int64_t c = lane; c <= r; c += kWarpSize) {
      sum = __dadd_rn(sum, static_cast<double>(expf(row[c] - max_logit)));
    }
    const double inverse = 1.0 / warp_sum(sum);
    for (int64_t c = lane; c <= r; c += kWarpSize) {
      row[c] =
          static_cast<float>(__dmul_rn(static_cast<double>(expf(row[c] - max_logit)), inverse));
    }
  }
}

// Launches block_means_kernel over the row chunks of num_heads heads.
template <bool kQuery>
void launch_block_means(std::conditional_t<kQuery, float, double>* means, const bf16* x,
                        const int32_t* active, int64_t num_heads, const flex::SearchShape& s,
                        cudaStream_t stream, unsigned max_blocks) {
  const int64_t groups_per_row = ceil_div(num_heads * s.head_dim / kChunkElems, kMeanThreads);
  const int64_t items = s.num_blocks * groups_per_row;
  const unsigned blocks = grid_for(items * kMeanThreads, kMeanThreads, max_blocks);
  // The side stream's means can hold SMs that the passes' blocks then need (until session 28 the
  // means were launched before the passes; pass 2 still starts while the query means run): an SM
  // changes its L1 / shared-memory split only when idle, so the means ask for the split the passes'
  // blocks need, lest those wait until the means end (docs/benchmarks.md, session 26: with pass 1's
  // launch delayed 40 us, 0.449 ms at 32K with this, 0.475 without).
  MF_CUDA_CHECK(cudaFuncSetAttribute(block_means_kernel<kQuery>,
                                     cudaFuncAttributePreferredSharedMemoryCarveout,
                                     cudaSharedmemCarveoutMaxShared));
  block_means_kernel<kQuery>
      <<<blocks, kMeanThreads, 0, stream>>>(means, x, active, num_heads, s, groups_per_row);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void fp32_key_block_means(double* k_means, const bf16* k, const flex::SearchShape& s,
                          cudaStream_t stream, unsigned max_blocks) {
  launch_block_means<false>(k_means, k, nullptr, s.num_kv_heads, s, stream, max_blocks);
}

void fp32_q_block_means(float* q_means, const bf16* q, const int32_t* active,
                        const flex::SearchShape& s, cudaStream_t stream, unsigned max_blocks) {
  launch_block_means<true>(q_means, q, active, s.num_q_heads, s, stream, max_blocks);
}

void fp32_block_logits(float* tri, const float* q_means, const double* k_means,
                       const int32_t* query_aware, const flex::SearchShape& s, cudaStream_t stream,
                       unsigned max_blocks) {
  const int64_t tiles = ceil_div(s.num_blocks, kTile);
  const int64_t tiles_per_head = tiles * (tiles + 1) / 2;
  const unsigned blocks =
      grid_for(s.num_q_heads * tiles_per_head * kLogitThreads, kLogitThreads, max_blocks);
  block_logits_kernel<<<blocks, kLogitThreads, 0, stream>>>(tri, q_means, k_means, query_aware, s,
                                                            tiles_per_head);
  MF_CUDA_CHECK_LAUNCH();
}

void fp32_block_softmax(float* tri, const int32_t* query_aware, const flex::SearchShape& s,
                        cudaStream_t stream) {
  const int64_t num_rows = s.num_q_heads * s.num_blocks;
  block_softmax_kernel<<<grid_for(num_rows * kWarpSize, kSoftmaxThreads), kSoftmaxThreads, 0,
                         stream>>>(tri, query_aware, s.num_q_heads, s.num_blocks);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
