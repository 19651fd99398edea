// Grouped expert GEMMs, configuration cooperative_128x256_cluster2: 128 x 256 x 64 tiles split
// between two consumer warpgroups, clusters of two CTAs along M that share each B tile by TMA
// multicast.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moeforge::cuda::detail {

std::unique_ptr<GroupedKernels> make_cooperative_128x256_cluster2_kernels(
    const GroupedDevice& device) {
  using namespace cute;
  using Config = Sm90Config<Shape<_128, _256, _64>, Shape<_2, _1, _1>,
                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                            cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  return std::make_unique<Sm90GroupedKernels<Config>>(device);
}

}  // namespace moeforge::cuda::detail
