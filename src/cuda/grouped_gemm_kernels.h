// The interface of one compiled configuration of the grouped expert GEMMs (tile shape, cluster
// shape, kernel schedule), implemented once per configuration in grouped_gemm_<config>.cu so that
// the configurations compile in parallel. GroupedGemm (grouped_gemm.h) picks one per product.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "cuda/bf16.h"
#include "cuda/grouped_gemm.h"

namespace moeforge::cuda::detail {

// The device the kernels run on and its SM count (the persistent grid).
struct GroupedDevice {
  int id = 0;
  int sm_count = 0;
};

class GroupedKernels {
 public:
  virtual ~GroupedKernels() = default;
  // Whether this configuration's kernels hold sm_90a code in this build.
  virtual bool compiled() const = 0;
  // The products of GroupedGemm (same arguments and meaning).
  virtual void forward(bf16* y, const bf16* x, const bf16* w, const int32_t* offsets,
                       const ExpertGemmShape& shape, cudaStream_t stream) = 0;
  virtual void backward_input(bf16* dx, const bf16* dy, const bf16* w, const int32_t* offsets,
                              const ExpertGemmShape& shape, bool accumulate,
                              cudaStream_t stream) = 0;
  virtual void backward_weight(float* dw, const bf16* dy, const bf16* x, const int32_t* offsets,
                               const ExpertGemmShape& shape, bool accumulate,
                               cudaStream_t stream) = 0;
};

// One factory per configuration (grouped_gemm_<config>.cu).
std::unique_ptr<GroupedKernels> make_cooperative_128x256_kernels(const GroupedDevice& device);
std::unique_ptr<GroupedKernels> make_cooperative_128x256_cluster2_kernels(
    const GroupedDevice& device);
std::unique_ptr<GroupedKernels> make_cooperative_256x128_kernels(const GroupedDevice& device);
std::unique_ptr<GroupedKernels> make_pingpong_128x128_kernels(const GroupedDevice& device);

}  // namespace moeforge::cuda::detail
