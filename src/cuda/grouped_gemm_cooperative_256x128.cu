// Grouped expert GEMMs, configuration cooperative_256x128: 256 x 128 x 64 tiles split between two
// consumer warpgroups, no cluster.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moeforge::cuda::detail {

std::unique_ptr<GroupedKernels> make_cooperative_256x128_kernels(const GroupedDevice& device) {
  using namespace cute;
  using Config = Sm90Config<Shape<_256, _128, _64>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                            cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  return std::make_unique<Sm90GroupedKernels<Config>>(device);
}

}  // namespace moeforge::cuda::detail
