// The CUTLASS pointer-array grouped GEMMs of one configuration (tile, cluster, schedule), included
// by one grouped_gemm_<config>.cu each. A one-thread-per-expert setup kernel turns the device row
// offsets into per-group problem shapes, pointers and strides; the GEMM reads them on the device,
// so nothing waits for the host.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <memory>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/grouped_gemm_kernels.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda::detail {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)
using GroupShape = ProblemShape::UnderlyingProblemShape;

// A configuration: CTA tile (M, N, K), cluster shape, mainloop and epilogue schedules.
template <class Tile, class Cluster, class MainloopSchedule, class EpilogueSchedule>
struct Sm90Config {
  using TileShape = Tile;
  using ClusterShape = Cluster;
  using Mainloop = MainloopSchedule;
  using Epilogue = EpilogueSchedule;
};

// D [M, N] row-major = A [M, K] * B, in CUTLASS's terms (B is N x K), over a persistent grid of
// all groups' tiles.
template <class Config, class LayoutA, class LayoutB, class ElementD>
struct Sm90GroupedGemm {
  using Element = cutlass::bfloat16_t;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 8;
  static constexpr int kAlignmentD = 16 / static_cast<int>(sizeof(ElementD));

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
      typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      ElementD, LayoutD*, kAlignmentD, ElementD, LayoutD*, kAlignmentD, typename Config::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Mainloop>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// Element offsets of group e's operands: base + row_stride * offsets[e] + expert_stride * e.
struct OperandOffsets {
  int64_t row_stride, expert_stride;
};

template <class G>
struct GroupArrays {
  GroupShape* shapes;
  const typename G::Element** a;
  const typename G::Element** b;
  const void** c;
  void** d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
};

// One thread per expert. (m, n, k) of group e: m or k is the expert's row count (row_dim says
// which, 0 or 2); a group with no rows gets m = 0 and so no tiles (a K = 0 group would still run
// tiles).
template <class G, class ElementD>
__global__ void setup_groups_kernel(GroupArrays<G> arrays, const int32_t* offsets, int num_experts,
                                    int row_dim, int dim0, int dim1, const typename G::Element* a,
                                    OperandOffsets a_off, const typename G::Element* b,
                                    OperandOffsets b_off, ElementD* d, OperandOffsets d_off,
                                    typename G::StrideA stride_a, typename G::StrideB stride_b,
                                    typename G::StrideD stride_d) {
  const int e = static_cast<int>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  const int64_t begin = offsets[e];
  const int rows = offsets[e + 1] - offsets[e];
  int m = dim0, n = dim1, k = rows;
  if (row_dim == 0) {
    m = rows;
    k = dim1;
    n = dim0;
  }
  if (rows == 0) m = 0;
  arrays.shapes[e] = cute::make_shape(m, n, k);
  arrays.a[e] = a + a_off.row_stride * begin + a_off.expert_stride * e;
  arrays.b[e] = b + b_off.row_stride * begin + b_off.expert_stride * e;
  ElementD* out = d + d_off.row_stride * begin + d_off.expert_stride * e;
  arrays.c[e] = out;
  arrays.d[e] = out;
  arrays.stride_a[e] = stride_a;
  arrays.stride_b[e] = stride_b;
  arrays.stride_d[e] = stride_d;
}

namespace {  // one copy per configuration's translation unit

// One block per expert: zeros dW_e [size] of an expert with no rows (the grouped GEMM gives such a
// group no tiles, so an assigning weight gradient would leave it unwritten).
__global__ void zero_empty_experts_kernel(float* dw, const int32_t* offsets, int64_t size) {
  const int e = static_cast<int>(blockIdx.x);
  if (offsets[e + 1] != offsets[e]) return;
  float* out = dw + size * e;
  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) out[i] = 0.0f;
}

}  // namespace

// Device storage for one kind of grouped GEMM: per-group arrays and the kernel's workspace.
template <class G>
class GroupedRunner {
 public:
  // One grouped GEMM. row_dim 0: (m, n, k) = (rows, dim0, dim1); row_dim 2: (dim0, dim1, rows).
  template <class ElementD>
  void run(const int32_t* offsets, int num_experts, int row_dim, int dim0, int dim1,
           const typename G::Element* a, OperandOffsets a_off, const typename G::Element* b,
           OperandOffsets b_off, ElementD* d, OperandOffsets d_off, float beta, int m_const,
           int n_const, int k_const, const cutlass::KernelHardwareInfo& hw_info,
           cudaStream_t stream) {
    using cute::make_shape;
    reserve(num_experts);
    const auto stride_a =
        cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(m_const, k_const, 1));
    const auto stride_b =
        cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(n_const, k_const, 1));
    const auto stride_d =
        cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(m_const, n_const, 1));
    GroupArrays<G> arrays{reinterpret_cast<GroupShape*>(shapes_.data()),
                          reinterpret_cast<const typename G::Element**>(ptr_a_.data()),
                          reinterpret_cast<const typename G::Element**>(ptr_b_.data()),
                          reinterpret_cast<const void**>(ptr_c_.data()),
                          reinterpret_cast<void**>(ptr_d_.data()),
                          reinterpret_cast<typename G::StrideA*>(stride_a_.data()),
                          reinterpret_cast<typename G::StrideB*>(stride_b_.data()),
                          reinterpret_cast<typename G::StrideD*>(stride_d_.data())};
    constexpr int kThreads = 128;
    setup_groups_kernel<G, ElementD>
        <<<static_cast<unsigned>(ceil_div(num_experts, kThreads)), kThreads, 0, stream>>>(
            arrays, offsets, num_experts, row_dim, dim0, dim1, a, a_off, b, b_off, d, d_off,
            stride_a, stride_b, stride_d);
    MF_CUDA_CHECK_LAUNCH();

    using ElementC = typename G::Gemm::ElementC;
    using ElementOut = typename G::Gemm::EpilogueOutputOp::ElementOutput;
    typename G::Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {num_experts, arrays.shapes, nullptr};
    args.mainloop = {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = beta;
    args.epilogue.ptr_C = reinterpret_cast<const ElementC**>(arrays.c);
    args.epilogue.dC = arrays.stride_d;
    args.epilogue.ptr_D = reinterpret_cast<ElementOut**>(arrays.d);
    args.epilogue.dD = arrays.stride_d;
    args.hw_info = hw_info;
    MF_CHECK(gemm_.can_implement(args) == cutlass::Status::kSuccess,
             "grouped GEMM: CUTLASS cannot run this problem ({} experts, {} x {})", num_experts,
             dim0, dim1);
    const size_t workspace_bytes = G::Gemm::get_workspace_size(args);
    if (workspace_.size() < workspace_bytes) workspace_.resize(workspace_bytes);
    MF_CHECK(gemm_.initialize(args, workspace_.data(), stream) == cutlass::Status::kSuccess,
             "grouped GEMM: CUTLASS initialisation failed");
    MF_CHECK(gemm_.run(stream) == cutlass::Status::kSuccess, "grouped GEMM: launch failed");
    MF_CUDA_CHECK_LAUNCH();
  }

 private:
  void reserve(int num_experts) {
    const auto n = static_cast<size_t>(num_experts);
    if (shapes_.size() >= n * sizeof(GroupShape)) return;
    shapes_.resize(n * sizeof(GroupShape));
    ptr_a_.resize(n);
    ptr_b_.resize(n);
    ptr_c_.resize(n);
    ptr_d_.resize(n);
    stride_a_.resize(n * sizeof(typename G::StrideA));
    stride_b_.resize(n * sizeof(typename G::StrideB));
    stride_d_.resize(n * sizeof(typename G::StrideD));
  }

  typename G::Gemm gemm_;
  DeviceBuffer<uint8_t> shapes_, stride_a_, stride_b_, stride_d_, workspace_;
  DeviceBuffer<uintptr_t> ptr_a_, ptr_b_, ptr_c_, ptr_d_;
};

// Whether the kernel of G was compiled for sm_90a in this build (an sm_80-only build holds a stub).
template <class G>
bool has_sm90_code() {
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, cutlass::device_kernel<typename G::Kernel>) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion == 90;
}

inline const cutlass::bfloat16_t* cutlass_bf16(const bf16* p) {
  return reinterpret_cast<const cutlass::bfloat16_t*>(p);
}

// The three products of one configuration.
template <class Config>
class Sm90GroupedKernels final : public GroupedKernels {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  // forward: A = x rows [count, in], B = W_e [out, in] (K-major) -> y [count, out].
  using Forward = Sm90GroupedGemm<Config, RowMajor, ColumnMajor, cutlass::bfloat16_t>;
  // backward_input: A = dy rows [count, out], B = W_e read as [out, in] (N-major) -> dx [count,
  // in].
  using BackwardInput = Sm90GroupedGemm<Config, RowMajor, RowMajor, cutlass::bfloat16_t>;
  // backward_weight: A = dy^T [out, count] (M-major), B = x rows [count, in] (N-major) -> dW
  // [out, in].
  using BackwardWeight = Sm90GroupedGemm<Config, ColumnMajor, RowMajor, float>;

 public:
  explicit Sm90GroupedKernels(const GroupedDevice& device) {
    hw_info_.device_id = device.id;
    hw_info_.sm_count = device.sm_count;
  }

  bool compiled() const override {
    return has_sm90_code<Forward>() && has_sm90_code<BackwardInput>() &&
           has_sm90_code<BackwardWeight>();
  }

  void forward(bf16* y, const bf16* x, const bf16* w, const int32_t* offsets,
               const ExpertGemmShape& shape, cudaStream_t stream) override {
    const int in = static_cast<int>(shape.in), out = static_cast<int>(shape.out);
    // (m, n, k) = (rows, out, in).
    forward_.run(offsets, static_cast<int>(shape.num_experts), 0, out, in, cutlass_bf16(x),
                 OperandOffsets{in, 0}, cutlass_bf16(w), OperandOffsets{0, shape.out * shape.in},
                 reinterpret_cast<cutlass::bfloat16_t*>(y), OperandOffsets{out, 0}, 0.0f, 1, out,
                 in, hw_info_, stream);
  }

  void backward_input(bf16* dx, const bf16* dy, const bf16* w, const int32_t* offsets,
                      const ExpertGemmShape& shape, bool accumulate, cudaStream_t stream) override {
    const int in = static_cast<int>(shape.in), out = static_cast<int>(shape.out);
    // (m, n, k) = (rows, in, out).
    backward_input_.run(offsets, static_cast<int>(shape.num_experts), 0, in, out, cutlass_bf16(dy),
                        OperandOffsets{out, 0}, cutlass_bf16(w),
                        OperandOffsets{0, shape.out * shape.in},
                        reinterpret_cast<cutlass::bfloat16_t*>(dx), OperandOffsets{in, 0},
                        accumulate ? 1.0f : 0.0f, 1, in, out, hw_info_, stream);
  }

  void backward_weight(float* dw, const bf16* dy, const bf16* x, const int32_t* offsets,
                       const ExpertGemmShape& shape, bool accumulate,
                       cudaStream_t stream) override {
    const int in = static_cast<int>(shape.in), out = static_cast<int>(shape.out);
    // (m, n, k) = (out, in, rows).
    backward_weight_.run(offsets, static_cast<int>(shape.num_experts), 2, out, in, cutlass_bf16(dy),
                         OperandOffsets{out, 0}, cutlass_bf16(x), OperandOffsets{in, 0}, dw,
                         OperandOffsets{0, shape.out * shape.in}, accumulate ? 1.0f : 0.0f, out, in,
                         1, hw_info_, stream);
    if (!accumulate) {
      constexpr int kThreads = 256;
      zero_empty_experts_kernel<<<static_cast<unsigned>(shape.num_experts), kThreads, 0, stream>>>(
          dw, offsets, shape.out * shape.in);
      MF_CUDA_CHECK_LAUNCH();
    }
  }

 private:
  cutlass::KernelHardwareInfo hw_info_;
  GroupedRunner<Forward> forward_;
  GroupedRunner<BackwardInput> backward_input_;
  GroupedRunner<BackwardWeight> backward_weight_;
};

}  // namespace moeforge::cuda::detail
