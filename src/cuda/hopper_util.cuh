// Hopper (sm_90a) building blocks of the wgmma kernels (cuda/block_sparse_attention_sm90.cu, the
// FlexPrefill search's passes in cuda/flex_prefill_fp32_passes_sm90.cu): wgmma shared-memory
// descriptors of the 128-byte-swizzled layout that TMA writes (64-element panels of 128-byte rows,
// 16-byte chunk c of row r at chunk c ^ (r % 8)), the wgmma instructions and their fences,
// mbarriers, named barriers, register reallocation and TMA loads. Device code only for sm_90a.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/mma_util.cuh"
#include "cuda/tensor_map.h"

namespace moeforge::cuda {

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
// The same with the id known to ptxas, which then reserves only the ids used (with ids in
// registers it reserves all 16).
template <int kId>
__device__ __forceinline__ void named_barrier_sync(int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
template <int kId>
__device__ __forceinline__ void named_barrier_arrive(int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
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

// Keeps the compiler from moving reads or writes of x across this point, nor reusing its register
// while an asynchronous wgmma may still read (A fragments) or write (accumulators) it.
__device__ __forceinline__ void fence_operand(uint32_t& x) {
  asm volatile("" : "+r"(x)::"memory");
}
__device__ __forceinline__ void fence_operand(float& x) {
  asm volatile("" : "+f"(x)::"memory");
}

#endif

}  // namespace moeforge::cuda
