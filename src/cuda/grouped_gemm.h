// The experts' GEMMs as grouped GEMMs over contiguous row ranges whose bounds stay on the device
// (the row map's expert offsets): one launch per projection and no host synchronisation. On an
// sm_90 device with sm_90a code in the build, through CUTLASS's pointer-array TMA warp-specialized
// kernels (problem shapes read on the device); elsewhere available() is false and callers use
// per-expert cuBLASLt calls.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// num_experts weights of [out, in] each, stored one after another; rows of expert e are
// [offsets[e], offsets[e + 1]) of the row-major activations (offsets: device int32 [E + 1]).
struct ExpertGemmShape {
  int64_t num_experts;
  int64_t in, out;
};

class GroupedGemm {
 public:
  GroupedGemm();
  ~GroupedGemm();
  GroupedGemm(const GroupedGemm&) = delete;
  GroupedGemm& operator=(const GroupedGemm&) = delete;

  // Whether the grouped kernels run here for this shape: an sm_90 device, sm_90a code in this
  // build, in and out multiples of 8 (16-byte rows for TMA). MOEFORGE_GROUPED_GEMM=0 turns it off.
  bool available(const ExpertGemmShape& shape) const;

  // y [rows, out] (bf16): rows of expert e = x rows [rows, in] * W_e^T.
  void forward(bf16* y, const bf16* x, const bf16* w, const int32_t* offsets,
               const ExpertGemmShape& shape, cudaStream_t stream);
  // dx [rows, in] (bf16; = or, with accumulate, +=): rows of expert e = dy rows [rows, out] * W_e.
  void backward_input(bf16* dx, const bf16* dy, const bf16* w, const int32_t* offsets,
                      const ExpertGemmShape& shape, bool accumulate, cudaStream_t stream);
  // dW_e [out, in] (fp32) = dy_e^T x_e over the rows of expert e, or += when accumulate. An
  // expert with no rows keeps dW_e when accumulating and gets zeros when assigning.
  void backward_weight(float* dw, const bf16* dy, const bf16* x, const int32_t* offsets,
                       const ExpertGemmShape& shape, bool accumulate, cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moeforge::cuda
