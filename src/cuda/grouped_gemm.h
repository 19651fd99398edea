// The experts' GEMMs as grouped GEMMs over contiguous row ranges whose bounds stay on the device
// (the row map's expert offsets): one launch per projection and no host synchronisation. On an
// sm_90 device with sm_90a code in the build, through CUTLASS's pointer-array TMA warp-specialized
// kernels (problem shapes read on the device); elsewhere available() is false and callers use
// per-expert cuBLASLt calls. Several CUTLASS configurations are compiled (the kernel lab, `moeforge
// bench gemm`, times them all); each product runs the one chosen at construction.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// num_experts weights of [out, in] each, stored one after another; rows of expert e are
// [offsets[e], offsets[e + 1]) of the row-major activations (offsets: device int32 [E + 1]).
struct ExpertGemmShape {
  int64_t num_experts;
  int64_t in, out;
};

// The compiled configurations: CTA tile (M x N), kernel schedule, cluster.
enum class GroupedGemmKernel {
  kCooperative128x256,
  kCooperative128x256Cluster2,
  kCooperative256x128,
  kPingpong128x128,
};
inline constexpr std::array<GroupedGemmKernel, 4> kGroupedGemmKernels{
    GroupedGemmKernel::kCooperative128x256, GroupedGemmKernel::kCooperative128x256Cluster2,
    GroupedGemmKernel::kCooperative256x128, GroupedGemmKernel::kPingpong128x128};
// "cooperative_128x256", "cooperative_128x256_cluster2", "cooperative_256x128",
// "pingpong_128x128".
const char* grouped_gemm_kernel_name(GroupedGemmKernel kernel);
// The kernel of that name, or nullopt.
std::optional<GroupedGemmKernel> parse_grouped_gemm_kernel(const std::string& name);

// The configuration of each product; the defaults are the kernel lab's fastest on the bench
// config's expert shapes on an H200 (docs/benchmarks.md, session 14).
struct GroupedGemmKernels {
  GroupedGemmKernel forward = GroupedGemmKernel::kCooperative128x256;
  GroupedGemmKernel backward_input = GroupedGemmKernel::kCooperative128x256;
  GroupedGemmKernel backward_weight = GroupedGemmKernel::kCooperative128x256Cluster2;
};
// The defaults above, or what MOEFORGE_GROUPED_GEMM names: one kernel name for all three
// products, or three comma-separated names (forward, backward_input, backward_weight). An unknown
// name is an error; "0" (no grouped GEMMs, see available()) leaves the defaults.
GroupedGemmKernels grouped_gemm_kernels_from_env();

class GroupedGemm {
 public:
  explicit GroupedGemm(const GroupedGemmKernels& kernels = grouped_gemm_kernels_from_env());
  ~GroupedGemm();
  GroupedGemm(const GroupedGemm&) = delete;
  GroupedGemm& operator=(const GroupedGemm&) = delete;

  // Whether the grouped kernels run here for this shape: an sm_90 device, sm_90a code in this
  // build, in and out multiples of 8 (16-byte rows for TMA). MOEFORGE_GROUPED_GEMM=0 turns it off.
  bool available(const ExpertGemmShape& shape) const;
  const GroupedGemmKernels& kernels() const;

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
