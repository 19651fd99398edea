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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/error.h"
#include "cuda/accumulator_fragments.cuh"
#include "cuda/block_sparse_attention_kernels.h"
#include "cuda/block_sparse_tile_walk.cuh"
#include "cuda/cuda_check.h"
#include "cuda/hopper_util.cuh"
#include "cuda/kernel_util.cuh"
#include "cuda/mma_util.cuh"
#include "cuda/tensor_map.h"

namespace moeforge::cuda {
namespace {

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

// P (64 x kKeys, fp32 in the S accumulator layout) packed to bf16 pairs: wgmma's A fragments of
// the k16 steps of O += P V.
template <int kKeys>
__device__ __forceinline__ void pack_probabilities(uint32_t (&p)[kKeys / 4],
                                                   const float (&s)[kKeys / 2]) {
#pragma unroll
  for (int i = 0; i < kKeys / 4; ++i) p[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
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
    mask_keys_past_rows<kKeyTiles>(s, static_cast<int>(c.t0 - warp_row0), g, t);
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

template <int kConsumers, int kHeadDim>
void launch(const BlockSparseLaunch& a, cudaStream_t stream) {
  using Cfg = HopperConfig<kConsumers, kHeadDim>;
  const HopperArgs args{
      a, bf16_tensor_map(a.q, a.seq_len, int64_t{a.num_q_heads} * kHeadDim, Cfg::kRows),
      bf16_tensor_map(a.k, a.seq_len, int64_t{a.num_kv_heads} * kHeadDim, Cfg::kKeys),
      bf16_tensor_map(a.v, a.seq_len, int64_t{a.num_kv_heads} * kHeadDim, Cfg::kKeys)};
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
