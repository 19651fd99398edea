// GroupedGemm: the products of the configurations chosen at construction (grouped_gemm.h), run by
// the compiled CUTLASS kernels of grouped_gemm_<config>.cu.
#include "cuda/grouped_gemm.h"

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/grouped_gemm_kernels.h"

namespace moeforge::cuda {

const char* grouped_gemm_kernel_name(GroupedGemmKernel kernel) {
  switch (kernel) {
    case GroupedGemmKernel::kCooperative128x256: return "cooperative_128x256";
    case GroupedGemmKernel::kCooperative128x256Cluster2: return "cooperative_128x256_cluster2";
    case GroupedGemmKernel::kCooperative256x128: return "cooperative_256x128";
    case GroupedGemmKernel::kPingpong128x128: return "pingpong_128x128";
  }
  return "";
}

std::optional<GroupedGemmKernel> parse_grouped_gemm_kernel(const std::string& name) {
  for (const GroupedGemmKernel kernel : kGroupedGemmKernels) {
    if (name == grouped_gemm_kernel_name(kernel)) return kernel;
  }
  return std::nullopt;
}

GroupedGemmKernels grouped_gemm_kernels_from_env() {
  GroupedGemmKernels kernels;
  const char* env = std::getenv("MOEFORGE_GROUPED_GEMM");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "0") == 0) return kernels;
  std::vector<GroupedGemmKernel> named;
  std::stringstream list(env);
  for (std::string name; std::getline(list, name, ',');) {
    const auto kernel = parse_grouped_gemm_kernel(name);
    MF_CHECK(kernel.has_value(),
             "MOEFORGE_GROUPED_GEMM: unknown kernel '{}' (0, cooperative_128x256, "
             "cooperative_128x256_cluster2, cooperative_256x128 or pingpong_128x128)",
             name);
    named.push_back(*kernel);
  }
  MF_CHECK(named.size() == 1 || named.size() == 3,
           "MOEFORGE_GROUPED_GEMM: give one kernel name or three (forward, backward_input, "
           "backward_weight), not {}",
           named.size());
  kernels.forward = named[0];
  kernels.backward_input = named.size() == 3 ? named[1] : named[0];
  kernels.backward_weight = named.size() == 3 ? named[2] : named[0];
  return kernels;
}

namespace {

std::unique_ptr<detail::GroupedKernels> make_kernels(GroupedGemmKernel kernel,
                                                     const detail::GroupedDevice& device) {
  switch (kernel) {
    case GroupedGemmKernel::kCooperative128x256:
      return detail::make_cooperative_128x256_kernels(device);
    case GroupedGemmKernel::kCooperative128x256Cluster2:
      return detail::make_cooperative_128x256_cluster2_kernels(device);
    case GroupedGemmKernel::kCooperative256x128:
      return detail::make_cooperative_256x128_kernels(device);
    case GroupedGemmKernel::kPingpong128x128: return detail::make_pingpong_128x128_kernels(device);
  }
  MF_FAIL("unknown grouped GEMM kernel");
}

}  // namespace

struct GroupedGemm::Impl {
  GroupedGemmKernels choice;
  bool usable = false;
  // One instance per product, so that each keeps its own per-group arrays.
  std::unique_ptr<detail::GroupedKernels> forward, backward_input, backward_weight;
};

GroupedGemm::GroupedGemm(const GroupedGemmKernels& kernels) : impl_(std::make_unique<Impl>()) {
  Impl& impl = *impl_;
  impl.choice = kernels;
  detail::GroupedDevice device;
  int major = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device.id));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.id));
  MF_CUDA_CHECK(
      cudaDeviceGetAttribute(&device.sm_count, cudaDevAttrMultiProcessorCount, device.id));
  impl.forward = make_kernels(kernels.forward, device);
  impl.backward_input = make_kernels(kernels.backward_input, device);
  impl.backward_weight = make_kernels(kernels.backward_weight, device);
  const char* env = std::getenv("MOEFORGE_GROUPED_GEMM");
  const bool disabled = env != nullptr && std::strcmp(env, "0") == 0;
  impl.usable = !disabled && major == 9 && impl.forward->compiled() &&
                impl.backward_input->compiled() && impl.backward_weight->compiled();
}

GroupedGemm::~GroupedGemm() = default;

bool GroupedGemm::available(const ExpertGemmShape& shape) const {
  return impl_->usable && shape.in % 8 == 0 && shape.out % 8 == 0 && shape.num_experts > 0;
}

const GroupedGemmKernels& GroupedGemm::kernels() const {
  return impl_->choice;
}

namespace {

void check_available(const GroupedGemm& gemm, const ExpertGemmShape& shape) {
  MF_CHECK(gemm.available(shape),
           "grouped GEMM is not available for {} experts of [{}, {}] on this device/build",
           shape.num_experts, shape.out, shape.in);
}

}  // namespace

void GroupedGemm::forward(bf16* y, const bf16* x, const bf16* w, const int32_t* offsets,
                          const ExpertGemmShape& shape, cudaStream_t stream) {
  check_available(*this, shape);
  impl_->forward->forward(y, x, w, offsets, shape, stream);
}

void GroupedGemm::backward_input(bf16* dx, const bf16* dy, const bf16* w, const int32_t* offsets,
                                 const ExpertGemmShape& shape, bool accumulate,
                                 cudaStream_t stream) {
  check_available(*this, shape);
  impl_->backward_input->backward_input(dx, dy, w, offsets, shape, accumulate, stream);
}

void GroupedGemm::backward_weight(float* dw, const bf16* dy, const bf16* x, const int32_t* offsets,
                                  const ExpertGemmShape& shape, bool accumulate,
                                  cudaStream_t stream) {
  check_available(*this, shape);
  impl_->backward_weight->backward_weight(dw, dy, x, offsets, shape, accumulate, stream);
}

}  // namespace moeforge::cuda
