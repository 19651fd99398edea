// The fp32 FlexPrefill search's checks (cuda/flex_prefill_fp32.h), and step 2's coverage counts of
// the fp32 vertical / slash values by the fixed-point radix select of cuda/coverage_select.h over
// the segments of all heads that are not query-aware at once.
#include <cstdint>

#include "core/error.h"
#include "cuda/coverage_select.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {

void check_fp32_search(const flex::SearchShape& s, const bf16* q, const bf16* k) {
  constexpr const char* kWho = "flex_prefill_select (CUDA, fast search)";
  MF_CHECK(s.head_dim % 8 == 0,
           "{}: head_dim must be a multiple of 8, got {} (the exact search, --flex-search exact, "
           "takes any head_dim)",
           kWho, s.head_dim);
  MF_CHECK(aligned_to(16, q, k), "{}: q and k must be 16-byte aligned", kWho);
  int device = 0, major = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MF_CHECK(major >= 8,
           "{}: needs bf16 tensor cores (compute capability 8.0 or later), device {} has {}.x",
           kWho, device, major);
  int smem_limit = 0;
  MF_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t smem = fp32_scores_smem_bytes(s);
  MF_CHECK(smem <= static_cast<size_t>(smem_limit),
           "{}: head_dim {} at block size {} needs {} bytes of shared memory per block, device {} "
           "allows {} (the exact search, --flex-search exact, has no such limit)",
           kWho, s.head_dim, s.block_size, smem, device, smem_limit);
}

void fp32_coverage_counts(unsigned long long* coverage_counts, const float* vs,
                          const flex::SearchShape& s, double gamma, const int32_t* query_aware,
                          cudaStream_t stream, void* workspace, SelectPath path) {
  coverage_select(coverage_counts, static_cast<uint8_t*>(nullptr), vs, s.num_q_heads * 2, s.seq_len,
                  gamma, SegmentFilter{query_aware, 2, true}, stream, workspace, path);
}

}  // namespace moeforge::cuda
