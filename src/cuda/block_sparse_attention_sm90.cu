// The Hopper block-sparse causal attention kernel (sm_90a: wgmma; see block_sparse_attention.h):
// a block of kWarpgroups warpgroups owns 64 * kWarpgroups query rows of one head (64 per
// warpgroup), head_dim 128. Key tiles of 64 keys stream through a two-stage cp.async pipeline in
// the order of the row's CSR list, into 128-byte-swizzled shared memory (the canonical wgmma
// layout: 64-element panels of 128-byte rows, 16-byte chunk c of row r stored at chunk c ^ (r %
// 8)). S = Q K^T is wgmma m64n64k16 with both operands in shared memory (K-major); P = exp(S - max)
// goes to bf16 registers as wgmma's A fragment, and O += P V is wgmma m64n128k16 with V read
// MN-major (transposed by the hardware). The online softmax is the tensor-core kernel's
// (block_sparse_attention_tc.cu), on the same accumulator layout. Not yet: TMA loads, warp
// specialisation (producer / consumer warpgroups), overlapping softmax with the next tile's
// MMAs, GQA-shared K/V tiles.
#include <cmath>
#include <cstdint>

#include "cuda/block_sparse_attention_kernels.h"
#include "cuda/block_sparse_tile_walk.cuh"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/mma_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kHeadDim = 128;
constexpr int kKeys = 64;  // keys per pipeline stage (the N of S = Q K^T)
constexpr int kStages = 2;

template <int kWarpgroups>
struct HopperConfig {
  static constexpr int kRows = 64 * kWarpgroups;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kQBytes = kRows * kHeadDim * 2;
  static constexpr int kTileBytes = kKeys * kHeadDim * 2;  // one K or V tile
  static constexpr size_t kSmemBytes = kQBytes + 2 * kStages * kTileBytes;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kRowBytes = 128;  // one swizzled row of a 64-element panel

// Byte offset of 16-byte chunk `chunk` (0 .. head_dim / 8) of row `row` in a tile of `rows` rows
// stored as 64-element panels with the 128-byte swizzle.
__device__ __forceinline__ uint32_t swizzled_offset(int rows, int row, int chunk) {
  const int panel = chunk / 8, c = chunk % 8;
  return static_cast<uint32_t>(panel * rows * kRowBytes + row * kRowBytes + ((c ^ (row % 8)) * 16));
}

// A wgmma shared-memory matrix descriptor with the 128-byte swizzle: start address, leading and
// stride byte offsets (all in 16-byte units).
__device__ __forceinline__ uint64_t make_descriptor(uint32_t address, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  uint64_t desc = static_cast<uint64_t>((address & 0x3FFFF) >> 4);
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32;
  desc |= uint64_t{1} << 62;
  return desc;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Orders this thread's generic-proxy writes of shared memory (cp.async) before the async proxy's
// reads (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// d (64 x 64 fp32 per warpgroup) += A (64 x 16, shared memory, K-major) * B (16 x 64, shared
// memory, K-major): wgmma m64n64k16 bf16.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t a_desc,
                                                   uint64_t b_desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a_desc), "l"(b_desc)
      : "memory");
}

// d (64 x 128 fp32 per warpgroup) += A (64 x 16 bf16 in registers, the m16n8k16 A fragment of
// each warp's 16 rows) * B (16 x 128, shared memory, MN-major: transposed on load).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4],
                                                    uint64_t b_desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, "
      "%63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc)
      : "memory");
}

#endif

template <int kWarpgroups>
__global__ void __launch_bounds__(kWarpgroups * 128)
    block_sparse_attention_sm90_kernel(BlockSparseLaunch a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = HopperConfig<kWarpgroups>;
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
  constexpr int kKeyTiles = kKeys / 8;   // n8 blocks of S
  constexpr int kDimTiles = kHeadDim / 8;
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* q_tile = smem;                   // [kRows] rows, swizzled panels
  unsigned char* kv_tiles = smem + Cfg::kQBytes;  // [kStages][K, V] tiles of kKeys rows

  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (a.num_q_heads / a.num_kv_heads);
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * Cfg::kRows;
  const int tid = static_cast<int>(threadIdx.x);
  const int warpgroup = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t q_row_stride = static_cast<int64_t>(a.num_q_heads) * kHeadDim;
  const int64_t kv_row_stride = static_cast<int64_t>(a.num_kv_heads) * kHeadDim;
  const bf16* q_head = a.q + static_cast<int64_t>(head) * kHeadDim;
  const bf16* k_head = a.k + static_cast<int64_t>(kv_head) * kHeadDim;
  const bf16* v_head = a.v + static_cast<int64_t>(kv_head) * kHeadDim;

  for (int idx = tid; idx < Cfg::kRows * kChunks; idx += Cfg::kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t pos = row0 + r;
    const bool valid = pos < a.seq_len;
    cp_async_16(q_tile + swizzled_offset(Cfg::kRows, r, c),
                valid ? q_head + pos * q_row_stride + c * 8 : a.q, valid);
  }
  cp_async_commit();

  const TileWalk<kKeys> walk(a, head, row0, Cfg::kRows);
  const auto load_tile = [&](TileCursor c, int stage) {
    unsigned char* k_dst = kv_tiles + stage * 2 * Cfg::kTileBytes;
    unsigned char* v_dst = k_dst + Cfg::kTileBytes;
    const int64_t key_end = walk.block_end(c.e);
    for (int idx = tid; idx < kKeys * kChunks; idx += Cfg::kThreads) {
      const int j = idx / kChunks, ch = idx % kChunks;
      const int64_t key = c.t0 + j;
      const bool valid = key < key_end;
      const int64_t offset = key * kv_row_stride + ch * 8;
      const uint32_t dst = swizzled_offset(kKeys, j, ch);
      cp_async_16(k_dst + dst, valid ? k_head + offset : a.k, valid);
      cp_async_16(v_dst + dst, valid ? v_head + offset : a.v, valid);
    }
    cp_async_commit();
  };

  float o[4 * kDimTiles];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8
#pragma unroll
  for (int i = 0; i < 4 * kDimTiles; ++i) o[i] = 0.0f;

  // This thread's rows: 16 per warp, 64 per warpgroup.
  const int64_t wg_row0 = row0 + 64 * warpgroup;
  const int64_t warp_row0 = wg_row0 + 16 * warp;
  const uint32_t q_base = smem_address(q_tile) + 64 * warpgroup * kRowBytes;

  TileCursor cur = walk.first(walk.begin);
  if (walk.begin < walk.end) load_tile(cur, 0);
  for (int stage = 0; cur.e < walk.end; stage ^= 1) {
    const TileCursor next = walk.next(cur);
    if (next.e < walk.end) {
      load_tile(next, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();
    const uint32_t k_base = smem_address(kv_tiles + stage * 2 * Cfg::kTileBytes);
    const uint32_t v_base = k_base + Cfg::kTileBytes;
    const int64_t key_end = walk.block_end(cur.e);
    // Warpgroups whose rows all precede the tile have nothing to add (causal); the branch is
    // uniform over the warpgroup, as wgmma requires.
    if (cur.t0 <= wg_row0 + 63) {
      float s[4 * kKeyTiles];
#pragma unroll
      for (int i = 0; i < 4 * kKeyTiles; ++i) s[i] = 0.0f;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t panel_q = (kk / 4) * Cfg::kRows * kRowBytes;
        const uint32_t panel_k = (kk / 4) * kKeys * kRowBytes;
        const uint32_t step = (kk % 4) * 32;
        wgmma_m64n64k16_ss(s, make_descriptor(q_base + panel_q + step, 16, 1024),
                           make_descriptor(k_base + panel_k + step, 16, 1024));
      }
      wgmma_commit();
      wgmma_wait_all();

      const int key_shift = static_cast<int>(cur.t0 - warp_row0);
      const int key_limit = static_cast<int>(min(key_end - cur.t0, int64_t{kKeys}));
      const bool needs_mask = key_shift + kKeys - 1 > 0 || key_limit < kKeys;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float x = s[4 * n + c] * a.scale_log2;
          if (needs_mask) {
            const int row = g + (c >= 2 ? 8 : 0);
            const int key = 8 * n + 2 * t + (c % 2);
            if (key + key_shift > row || key >= key_limit) x = -INFINITY;
          }
          s[4 * n + c] = x;
        }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
          mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[half], mx);
        const float base = m_new == -INFINITY ? 0.0f : m_new;
        const float correction = exp2f(row_max[half] - base);
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
          const float p0 = exp2f(s[4 * n + 2 * half] - base);
          const float p1 = exp2f(s[4 * n + 2 * half + 1] - base);
          s[4 * n + 2 * half] = p0;
          s[4 * n + 2 * half + 1] = p1;
          sum += p0 + p1;
        }
        row_sum[half] = row_sum[half] * correction + sum;
        row_max[half] = m_new;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n) {
          o[4 * n + 2 * half] *= correction;
          o[4 * n + 2 * half + 1] *= correction;
        }
      }
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < kKeys / 16; ++j) {
        const uint32_t pa[4] = {
            pack_bf16(s[8 * j], s[8 * j + 1]), pack_bf16(s[8 * j + 2], s[8 * j + 3]),
            pack_bf16(s[8 * j + 4], s[8 * j + 5]), pack_bf16(s[8 * j + 6], s[8 * j + 7])};
        // Keys 16 j .. 16 j + 15: two 8-row groups of every panel of V; the panels (64 dims each)
        // are kKeys rows apart.
        wgmma_m64n128k16_rs(o, pa,
                            make_descriptor(v_base + j * 16 * kRowBytes, kKeys * kRowBytes, 1024));
      }
      wgmma_commit();
      wgmma_wait_all();
    }
    __syncthreads();  // this stage is consumed before the next iteration refills it
    cur = next;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t pos = warp_row0 + g + 8 * half;
    if (pos >= a.seq_len) continue;
    const float inv = 1.0f / sum;
    bf16* out_row = a.out + pos * q_row_stride + static_cast<int64_t>(head) * kHeadDim;
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * n + 2 * t) =
          __floats2bfloat162_rn(o[4 * n + 2 * half] * inv, o[4 * n + 2 * half + 1] * inv);
    }
    if (a.lse != nullptr && t == 0) {
      a.lse[static_cast<int64_t>(head) * a.seq_len + pos] =
          (row_max[half] + log2f(sum)) * 0.69314718055994531f;
    }
  }
#else
  __trap();  // launched only on sm_90 (hopper_block_sparse_attention_runs)
#endif
}

template <int kWarpgroups>
void launch(const BlockSparseLaunch& args, cudaStream_t stream) {
  using Cfg = HopperConfig<kWarpgroups>;
  launch_over_query_blocks(block_sparse_attention_sm90_kernel<kWarpgroups>, Cfg::kRows,
                           Cfg::kThreads, static_cast<int>(Cfg::kSmemBytes), args, stream);
}

}  // namespace

bool hopper_block_sparse_attention_runs(const BlockSparseLaunch& args, int device_major) {
  return device_major == 9 && args.head_dim == kHeadDim && args.block_size % 64 == 0 &&
         aligned_to(16, args.q, args.k, args.v, args.out);
}

void launch_hopper_block_sparse_attention(const BlockSparseLaunch& args, cudaStream_t stream) {
  // 128 query rows (two warpgroups sharing each K/V tile) where the block size allows, else 64.
  if (args.block_size % 128 == 0) {
    launch<2>(args, stream);
  } else {
    launch<1>(args, stream);
  }
}

}  // namespace moeforge::cuda
