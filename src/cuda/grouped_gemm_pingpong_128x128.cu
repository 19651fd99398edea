// Grouped expert GEMMs, configuration pingpong_128x128: 128 x 128 x 64 tiles, one per consumer
// warpgroup, the two warpgroups alternating so that one's epilogue overlaps the other's mainloop.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moeforge::cuda::detail {

std::unique_ptr<GroupedKernels> make_pingpong_128x128_kernels(const GroupedDevice& device) {
  using namespace cute;
  using Config = Sm90Config<Shape<_128, _128, _64>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                            cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
  return std::make_unique<Sm90GroupedKernels<Config>>(device);
}

}  // namespace moeforge::cuda::detail
