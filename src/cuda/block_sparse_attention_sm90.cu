// The Hopper block-sparse causal attention kernel (sm_90a; see block_sparse_attention.h), warp
// specialised: a producer warp loads Q once and the key tiles of the row's CSR list by TMA into a
// ring of kStages shared-memory stages (mbarriers: `full` when a stage's bytes have landed, `empty`
// when every consumer warp is done with it), and kConsumers consumer warpgroups own 64 query rows
// of one head each, head_dim 64 or 128. With two consumers (blocks of a multiple of 128) the tiles
// hold 128 keys and the producer is a whole warpgroup that hands its registers to the consumers
// (setmaxnreg), which need 160 for S, P and O; with one, 64 keys. TMA writes the canonical
// 128-byte-swizzled wgmma layout (64-element panels of 128-byte rows, 16-byte chunk c of row r at
// chunk c ^ (r % 8)), and zero-fills rows past the sequence end. S = Q K^T is wgmma m64nKk16
// (K = the tile's keys) with both operands in shared memory (K-major); P = exp(S - max) goes to
// bf16 registers as wgmma's A fragment, and O += P V is wgmma m64n128k16 (m64n64k16 at head_dim
// 64) with V read MN-major (transposed by the hardware). Within a warpgroup a tile's softmax runs
// while the tensor cores do the previous tile's P V (FlashAttention-3's intra-warpgroup overlap),
// and two warpgroups take turns issuing their wgmmas (FlashAttention-3's warp scheduler barrier),
// so one's softmax overlaps the other's MMAs. Only the tiles that need a causal mask (the last of
// the walk) run masking instructions. The online softmax is the tensor-core kernel's
// (block_sparse_attention_tc.cu), on the same accumulator layout. Measured and not kept (see
// docs/benchmarks.md): Q in registers for S (1-2% slower), a suspend-time hint on the mbarrier
// waits (no gain). Not yet: K/V tiles multicast to the CTAs of a GQA group (docs/design.md).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/error.h"
#include "cuda/block_sparse_attention_kernels.h"
#include "cuda/block_sparse_tile_walk.cuh"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/mma_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kPanel = 64;  // elements of a 128-byte swizzled row: one TMA box's width
constexpr int kMaxSmemBytes = 227 * 1024;  // an sm_90 block's shared-memory limit

// kKeys keys per pipeline stage (the N of S = Q K^T), as many as the CTA has query rows: as tiles
// start at multiples of kKeys within blocks and at or before the CTA's last row, every tile starts
// at or before its first row, so every warpgroup sees a key of every tile.
template <int kConsumers, int kHeadDim>
struct HopperConfig {
  static_assert(kConsumers == 1 || kConsumers == 2);
  static constexpr int kRows = 64 * kConsumers;
  static constexpr int kKeys = kRows;
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr bool kProducerWarpgroup = kConsumers == 2;
  static constexpr int kThreads = kConsumerThreads + (kProducerWarpgroup ? 128 : 32);
  static constexpr int kQBytes = kRows * kHeadDim * 2;
  static constexpr int kTileBytes = kKeys * kHeadDim * 2;  // one K or V tile
  // As many stages as fit, at most four.
  static constexpr int kStages = std::min(4, (kMaxSmemBytes - kQBytes - 128) / (2 * kTileBytes));
  static constexpr int kBarrierBytes = (1 + 2 * kStages) * 8;
  static constexpr size_t kSmemBytes = kQBytes + 2 * kStages * kTileBytes + kBarrierBytes;
  static_assert(kStages >= 2 && kSmemBytes <= kMaxSmemBytes);
};

// The kernel's arguments: the shapes and pointers, and TMA descriptors of Q ([N, Hq * 128], boxes
// of 64 columns x kRows rows) and of K and V ([N, Hkv * 128], boxes of 64 columns x kKeys rows).
struct HopperArgs {
  BlockSparseLaunch a;
  CUtensorMap q_map, k_map, v_map;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kRowBytes = 128;  // one swizzled row of a panel

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
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
}
// Named barrier `id` over `threads` threads: sync waits for all of them, arrive counts in and goes
// on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Waits until the barrier's phase of this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
}

// One TMA box (column c0, row c1 of the map's tensor) into shared memory at dst; its bytes count
// towards bar's transaction.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int c0, int c1,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_address(bar))
      : "memory");
}

// The wgmma wrappers' accumulator operands: 32 fp32 registers from d[0] (a macro, as asm operand
// lists cannot be built otherwise), and the matching register lists of the instruction text.
#define MF_WGMMA_D32(d)                                                                         \
  "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3]), "+f"((d)[4]), "+f"((d)[5]),           \
      "+f"((d)[6]), "+f"((d)[7]), "+f"((d)[8]), "+f"((d)[9]), "+f"((d)[10]), "+f"((d)[11]),     \
      "+f"((d)[12]), "+f"((d)[13]), "+f"((d)[14]), "+f"((d)[15]), "+f"((d)[16]), "+f"((d)[17]), \
      "+f"((d)[18]), "+f"((d)[19]), "+f"((d)[20]), "+f"((d)[21]), "+f"((d)[22]), "+f"((d)[23]), \
      "+f"((d)[24]), "+f"((d)[25]), "+f"((d)[26]), "+f"((d)[27]), "+f"((d)[28]), "+f"((d)[29]), \
      "+f"((d)[30]), "+f"((d)[31])
#define MF_WGMMA_REGS32                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MF_WGMMA_REGS64                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 x 64 fp32 per warpgroup) = A (64 x 16, shared memory, K-major) * B (16 x 64, shared
// memory, K-major) + (accumulate ? d : 0): wgmma m64n64k16 bf16.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t a_desc, uint64_t b_desc,
                                                   int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MF_WGMMA_REGS32
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      : MF_WGMMA_D32(d)
      : "l"(a_desc), "l"(b_desc), "r"(accumulate)
      : "memory");
}

// d (64 x 128 fp32 per warpgroup) = A (64 x 16, shared memory, K-major) * B (16 x 128, shared
// memory, K-major) + (accumulate ? d : 0): wgmma m64n128k16 bf16.
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t a_desc,
                                                    uint64_t b_desc, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MF_WGMMA_REGS64
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : MF_WGMMA_D32(d), MF_WGMMA_D32(d + 32)
      : "l"(a_desc), "l"(b_desc), "r"(accumulate)
      : "memory");
}

// d (64 x 64 fp32 per warpgroup) += A (64 x 16 bf16 in registers, the m16n8k16 A fragment of each
// warp's 16 rows) * B (16 x 64, shared memory, MN-major: transposed on load).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4],
                                                   uint64_t b_desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MF_WGMMA_REGS32
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : MF_WGMMA_D32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc)
      : "memory");
}

// d (64 x 128 fp32 per warpgroup) += A (64 x 16 bf16 in registers, the m16n8k16 A fragment of
// each warp's 16 rows) * B (16 x 128, shared memory, MN-major: transposed on load).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4],
                                                    uint64_t b_desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MF_WGMMA_REGS64
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : MF_WGMMA_D32(d), MF_WGMMA_D32(d + 32)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc)
      : "memory");
}
#undef MF_WGMMA_D32
#undef MF_WGMMA_REGS32
#undef MF_WGMMA_REGS64

// S = Q K^T of one warpgroup's 64 rows and one stage's kKeys keys, issued (not waited for); the
// first k-step overwrites s (no zeroing by other instructions, which would serialise the wgmmas).
template <int kRows, int kHeadDim, int kKeys>
__device__ __forceinline__ void issue_scores(float (&s)[kKeys / 2], uint32_t q_base,
                                             uint32_t k_base) {
  static_assert(kKeys == 64 || kKeys == 128, "S tiles are wgmma m64n64 or m64n128");
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    const uint32_t panel_q = (kk / 4) * kRows * kRowBytes;
    const uint32_t panel_k = (kk / 4) * kKeys * kRowBytes;
    const uint32_t step = (kk % 4) * 32;
    const uint64_t q_desc = make_descriptor(q_base + panel_q + step, 16, 1024);
    const uint64_t k_desc = make_descriptor(k_base + panel_k + step, 16, 1024);
    if constexpr (kKeys == 128) {
      wgmma_m64n128k16_ss(s, q_desc, k_desc, kk > 0 ? 1 : 0);
    } else {
      wgmma_m64n64k16_ss(s, q_desc, k_desc, kk > 0 ? 1 : 0);
    }
  }
  wgmma_commit();
}

// P (64 x kKeys, fp32 in the S accumulator layout) packed to bf16 pairs: wgmma's A fragments of
// the k16 steps of O += P V.
template <int kKeys>
__device__ __forceinline__ void pack_probabilities(uint32_t (&p)[kKeys / 4],
                                                   const float (&s)[kKeys / 2]) {
#pragma unroll
  for (int i = 0; i < kKeys / 4; ++i) p[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
}

// Keeps the compiler from moving reads or writes of x across this point, nor reusing its register
// while an asynchronous wgmma may still read (A fragments) or write (accumulators) it.
__device__ __forceinline__ void fence_operand(uint32_t& x) {
  asm volatile("" : "+r"(x)::"memory");
}
__device__ __forceinline__ void fence_operand(float& x) {
  asm volatile("" : "+f"(x)::"memory");
}

// O += P V of one stage, issued (not waited for); p must stay untouched until it completes.
template <int kHeadDim, int kKeys>
__device__ __forceinline__ void issue_values(float (&o)[kHeadDim / 2], uint32_t (&p)[kKeys / 4],
                                             uint32_t v_base) {
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < kKeys / 16; ++j) {
    const uint32_t pa[4] = {p[4 * j], p[4 * j + 1], p[4 * j + 2], p[4 * j + 3]};
    // Keys 16 j .. 16 j + 15: two 8-row groups of every panel of V; the panels (64 dims each) are
    // kKeys rows apart.
    const uint64_t v_desc = make_descriptor(v_base + j * 16 * kRowBytes, kKeys * kRowBytes, 1024);
    if constexpr (kHeadDim == 128) {
      wgmma_m64n128k16_rs(o, pa, v_desc);
    } else {
      wgmma_m64n64k16_rs(o, pa, v_desc);
    }
  }
  wgmma_commit();
}

#endif

template <int kConsumers, int kHeadDim>
__global__ void __launch_bounds__(HopperConfig<kConsumers, kHeadDim>::kThreads, 1)
    block_sparse_attention_sm90_kernel(const __grid_constant__ HopperArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = HopperConfig<kConsumers, kHeadDim>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kKeys = Cfg::kKeys;
  constexpr int kKeyTiles = kKeys / 8;  // n8 blocks of S
  constexpr int kDimTiles = kHeadDim / 8;
  const BlockSparseLaunch& a = args.a;
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* q_tile = smem;                   // [kRows] rows, swizzled panels
  unsigned char* kv_tiles = smem + Cfg::kQBytes;  // [kStages][K, V] tiles of kKeys rows
  uint64_t* q_full = reinterpret_cast<uint64_t*>(kv_tiles + 2 * kStages * Cfg::kTileBytes);
  uint64_t* full = q_full + 1;       // [kStages]
  uint64_t* empty = full + kStages;  // [kStages]

  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (a.num_q_heads / a.num_kv_heads);
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * Cfg::kRows;
  const int tid = static_cast<int>(threadIdx.x);
  // The warp index through a shuffle, so that the compiler knows it (and what derives from it) is
  // uniform over the warp: wgmma under a branch it cannot prove uniform gets serialised.
  const int warp = __shfl_sync(0xffffffffu, tid / 32, 0), lane = tid % 32;
  const TileWalk<kKeys> walk(a, head, row0, Cfg::kRows);

  if (tid == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 4 * kConsumers);  // lane 0 of every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 4 * kConsumers) {
    // The producer: Q once, then every key tile of the walk into the ring.
    // Per SM sub-partition one producer and two consumer warps share 16K registers: 24 + 2 x 240.
    if constexpr (Cfg::kProducerWarpgroup) setmaxnreg_dec<24>();
    if (warp == 4 * kConsumers && lane == 0) {
      mbarrier_arrive_expect_tx(q_full, Cfg::kQBytes);
      for (int p = 0; p < kHeadDim / kPanel; ++p) {
        tma_load(q_tile + p * Cfg::kRows * kRowBytes, &args.q_map, head * kHeadDim + p * kPanel,
                 static_cast<int>(row0), q_full);
      }
      int i = 0;
      for (TileCursor cur = walk.first(walk.begin); cur.e < walk.end; cur = walk.next(cur), ++i) {
        const int stage = i % kStages;
        mbarrier_wait(&empty[stage], ((i / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(&full[stage], 2 * Cfg::kTileBytes);
        unsigned char* k_dst = kv_tiles + stage * 2 * Cfg::kTileBytes;
        unsigned char* v_dst = k_dst + Cfg::kTileBytes;
        for (int p = 0; p < kHeadDim / kPanel; ++p) {
          const int column = kv_head * kHeadDim + p * kPanel;
          tma_load(k_dst + p * kKeys * kRowBytes, &args.k_map, column, static_cast<int>(cur.t0),
                   &full[stage]);
          tma_load(v_dst + p * kKeys * kRowBytes, &args.v_map, column, static_cast<int>(cur.t0),
                   &full[stage]);
        }
      }
    }
    return;
  }

  // A consumer warpgroup: rows [wg_row0, wg_row0 + 64), 16 per warp.
  if constexpr (Cfg::kProducerWarpgroup) setmaxnreg_inc<240>();
  const int warpgroup = warp / 4, g = lane / 4, t = lane % 4;
  const int64_t wg_row0 = row0 + 64 * warpgroup;
  const int64_t warp_row0 = wg_row0 + 16 * (warp % 4);
  const uint32_t q_base = smem_address(q_tile) + 64 * warpgroup * kRowBytes;
  const auto k_address = [&](int stage) {
    return smem_address(kv_tiles + stage * 2 * Cfg::kTileBytes);
  };
  const auto release = [&](int stage) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty[stage]);
  };
  float o[4 * kDimTiles];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8
#pragma unroll
  for (int i = 0; i < 4 * kDimTiles; ++i) o[i] = 0.0f;
  mbarrier_wait(q_full, 0);

  float s[kKeys / 2];
  uint32_t p[kKeys / 4];
  const auto fence_operands = [&] {
#pragma unroll
    for (int j = 0; j < kKeys / 4; ++j) fence_operand(p[j]);
#pragma unroll
    for (int j = 0; j < 4 * kDimTiles; ++j) fence_operand(o[j]);
#pragma unroll
    for (int j = 0; j < kKeys / 2; ++j) fence_operand(s[j]);
  };
  // Whether some row of this warpgroup must not see some key of the tile at c (the diagonal tile).
  // Such tiles come last in the walk, as the keys ascend. Keys past the sequence end (the last
  // block's, read as zeros) lie past every row that is stored, so causality masks them too.
  const auto needs_mask = [&](const TileCursor& c) { return c.t0 + kKeys - 1 > wg_row0; };
  // Sets s (S of the tile at c) to -infinity where the key lies past the row.
  const auto mask = [&](const TileCursor& c) {
    const int key_shift = static_cast<int>(c.t0 - warp_row0);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // Key 8 n + 2 t + j (j = 0, 1) of row g + 8 half stays iff 8 n + j <= last.
      const int last = g + 8 * half - key_shift - 2 * t;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        if (8 * n > last) s[4 * n + 2 * half] = -INFINITY;
        if (8 * n + 1 > last) s[4 * n + 2 * half + 1] = -INFINITY;
      }
    }
  };
  // Masks s (S of the tile at c) if `masked` (std::true_type or std::false_type: the unmasked
  // tiles get a copy of the loop without masking instructions; predicated, they would still take
  // issue slots), turns it into P = 2^(scale_log2 * s - running max) (one fused multiply-add per
  // logit) and updates the running max (of the scaled logits) and sum; correction gets the factor
  // by which O must shrink.
  const auto softmax = [&](const TileCursor& c, float(&correction)[2], auto masked) {
    if constexpr (decltype(masked)::value) mask(c);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
        mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // The scale is positive, so the maximum of the scaled logits is the scaled maximum.
      const float m_new = fmaxf(row_max[half], mx * a.scale_log2);
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      correction[half] = exp2_flush(row_max[half] - base);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        const float p0 = exp2_flush(fmaf(s[4 * n + 2 * half], a.scale_log2, -base));
        const float p1 = exp2_flush(fmaf(s[4 * n + 2 * half + 1], a.scale_log2, -base));
        s[4 * n + 2 * half] = p0;
        s[4 * n + 2 * half + 1] = p1;
        sum += p0 + p1;
      }
      row_sum[half] = row_sum[half] * correction[half] + sum;
      row_max[half] = m_new;
    }
  };
  // O shrinks by the correction (no P V in flight), and P goes to bf16 for the next P V.
  // Once the running maxima settle, most tiles leave every row's correction at exactly 1: the
  // warp then skips multiplying O by it (the result is the same bits).
  const auto rescale_and_pack = [&](const float(&correction)[2]) {
    if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        o[4 * n] *= correction[0];
        o[4 * n + 1] *= correction[0];
        o[4 * n + 2] *= correction[1];
        o[4 * n + 3] *= correction[1];
      }
    }
    pack_probabilities<kKeys>(p, s);
    fence_operands();  // final before the next wgmmas start
  };
  const auto fence_scores = [&] {
#pragma unroll
    for (int j = 0; j < kKeys / 2; ++j) fence_operand(s[j]);
  };

  // FlashAttention-3's warp scheduler barrier: the two consumer warpgroups take turns issuing their
  // wgmmas (named barriers 1 and 2), so that one's softmax runs while the other's GEMMs hold the
  // tensor cores. Both compute every tile of the walk (see HopperConfig), so their turns pair up;
  // warpgroup 0 goes first.
  constexpr bool kTakeTurns = kConsumers == 2;
  const auto wait_turn = [&] {
    if constexpr (kTakeTurns) named_barrier_sync(1 + warpgroup, 256);
  };
  const auto pass_turn = [&] {
    if constexpr (kTakeTurns) named_barrier_arrive(2 - warpgroup, 256);
  };
  if (kTakeTurns && warpgroup == 1) named_barrier_arrive(1, 256);

  TileCursor cur = walk.first(walk.begin);
  if (cur.e < walk.end) {
    // The first tile: S alone.
    int i = 0, previous_stage = 0;
    float correction[2];
    mbarrier_wait(&full[0], 0);
    wait_turn();
    issue_scores<Cfg::kRows, kHeadDim, kKeys>(s, q_base, k_address(previous_stage));
    pass_turn();
    wgmma_wait<0>();
    fence_scores();
    softmax(cur, correction, std::true_type{});
    rescale_and_pack(correction);
    cur = walk.next(cur);
    ++i;
    // Then per tile j: S_j and P_{j-1} V_{j-1} in flight together; S_j's softmax runs while the
    // tensor cores still work on P_{j-1} V_{j-1}. After each tile cur and i move on; the next
    // tile's col_idx read is issued first, so that its latency hides behind this tile's work.
    const auto step = [&](auto masked) {
      const int stage = i % kStages;
      const TileCursor following = walk.next(cur);
      mbarrier_wait(&full[stage], (i / kStages) & 1);
      wait_turn();
      issue_scores<Cfg::kRows, kHeadDim, kKeys>(s, q_base, k_address(stage));
      issue_values<kHeadDim, kKeys>(o, p, k_address(previous_stage) + Cfg::kTileBytes);
      pass_turn();
      wgmma_wait<1>();
      fence_scores();  // only S is final here: O and P belong to the P V in flight
      softmax(cur, correction, masked);
      wgmma_wait<0>();
      fence_operands();
      release(previous_stage);
      rescale_and_pack(correction);
      previous_stage = stage;
      cur = following;
      ++i;
    };
    while (cur.e < walk.end && !needs_mask(cur)) step(std::false_type{});
    while (cur.e < walk.end) step(std::true_type{});
    issue_values<kHeadDim, kKeys>(o, p, k_address(previous_stage) + Cfg::kTileBytes);
    wgmma_wait<0>();
    fence_operands();
    release(previous_stage);
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t pos = warp_row0 + g + 8 * half;
    if (pos >= a.seq_len) continue;
    const float inv = 1.0f / sum;
    const int64_t q_row_stride = static_cast<int64_t>(a.num_q_heads) * kHeadDim;
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

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link against libcuda,
// so binaries still start on machines without a driver).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    MF_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                   cudaEnableDefault, &status));
    MF_CHECK(status == cudaDriverEntryPointSuccess && fn != nullptr,
             "the CUDA driver has no cuTensorMapEncodeTiled (the Hopper attention kernel's TMA)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A TMA descriptor of a row-major bf16 [rows, columns] tensor read in boxes of kPanel columns x
// box_rows rows with the 128-byte swizzle; rows past the end read as zeros.
CUtensorMap tensor_map(const bf16* base, int64_t rows, int64_t columns, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(columns), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(columns) * sizeof(bf16)};
  const cuuint32_t box[2] = {kPanel, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MF_CHECK(result == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed ({}) for a [{}, {}] tensor",
           static_cast<int>(result), rows, columns);
  return map;
}

template <int kConsumers, int kHeadDim>
void launch(const BlockSparseLaunch& a, cudaStream_t stream) {
  using Cfg = HopperConfig<kConsumers, kHeadDim>;
  const HopperArgs args{a,
                        tensor_map(a.q, a.seq_len, int64_t{a.num_q_heads} * kHeadDim, Cfg::kRows),
                        tensor_map(a.k, a.seq_len, int64_t{a.num_kv_heads} * kHeadDim, Cfg::kKeys),
                        tensor_map(a.v, a.seq_len, int64_t{a.num_kv_heads} * kHeadDim, Cfg::kKeys)};
  const auto kernel = block_sparse_attention_sm90_kernel<kConsumers, kHeadDim>;
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(Cfg::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(ceil_div(a.seq_len, Cfg::kRows)),
                  static_cast<unsigned>(a.num_q_heads));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  MF_CUDA_CHECK_LAUNCH();
}

template <int kHeadDim>
void launch_for_head_dim(const BlockSparseLaunch& args, cudaStream_t stream) {
  // Two consumer warpgroups (128 query rows sharing each 128-key K/V tile) where the block size
  // allows, else one (64 rows and keys).
  if (args.block_size % 128 == 0) {
    launch<2, kHeadDim>(args, stream);
  } else {
    launch<1, kHeadDim>(args, stream);
  }
}

}  // namespace

bool hopper_block_sparse_attention_runs(const BlockSparseLaunch& args, int device_major) {
  // TMA coordinates are 32-bit.
  return device_major == 9 && (args.head_dim == 64 || args.head_dim == 128) &&
         args.block_size % 64 == 0 && args.seq_len < (int64_t{1} << 31) &&
         aligned_to(16, args.q, args.k, args.v, args.out);
}

void launch_hopper_block_sparse_attention(const BlockSparseLaunch& args, cudaStream_t stream) {
  if (args.head_dim == 128) {
    launch_for_head_dim<128>(args, stream);
  } else {
    launch_for_head_dim<64>(args, stream);
  }
}

}  // namespace moeforge::cuda
