// RMSNorm kernels: one warp per row (4 columns per lane and access where the width allows). The
// backward kernel also sums its block's rows' weight-gradient terms (fixed-order partial sums, no
// atomics, so results are reproducible); rows wider than its shared memory holds take a second
// kernel for them.
#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"
#include "cuda/reductions.h"
#include "cuda/rmsnorm.h"

namespace moeforge::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpsPerBlock * kWarpSize;
constexpr int64_t kRowsPerChunk = 256;  // rows per partial sum of dweight in the two-pass path

// A row of at least kColumnUnroll column groups (kWarpSize * kWidth columns each) is read
// kColumnUnroll groups at a time in the first pass, all their loads issued before any is used: one
// group at a time leaves a warp only 1 KB of fp32 dout and inp in flight, too little for the few
// warps per SM that the fused kernel's registers and shared memory allow on wide rows.
constexpr int kColumnUnroll = 4;

// Grid of the fused backward. It is bound by HBM bandwidth, and an H200 (4.8 TB/s, about 1 us of
// latency under load) needs some 5 MB of loads in flight. A warp has 4 KB of dout and inp in flight
// at fp32 with c >= 512 (kColumnUnroll groups), 512 B at bf16 with c = 128 (q/k norm: one group).
// So wide rows need few blocks, and narrow ones as many as fit: at most kWarpColumnsInFlight /
// (kWarpsPerBlock * min(c, kColumnsInFlightPerWarp)) blocks, and at most kMaxPartials:
// - c >= 512: 256 blocks, 8 MB in flight. At c = 2048 (64 KB of shared memory, 96 registers per
//   thread) 2 blocks fit per SM, so all 256 are resident at once on an H100/H200 (132 SMs); and the
//   2048 rows in progress (32 MB of fp32 dout and inp) stay in L2 (50 MB) for the second pass.
// - c <= 128: 1024 blocks, about 1.3 waves at the 6 blocks per SM that registers allow (40 per
//   thread, as many warps per SM as the two-pass path's kernel); as many partials as that path's
//   n / 256 at n = 262144.
// Each warp takes ceil(n / (kWarpsPerBlock * blocks)) rows; a smaller n gets one row per warp and
// fewer blocks. The partials must stay few: accumulate_chunk_sums loops over them, one thread per
// column.
constexpr int64_t kColumnsInFlightPerWarp = kColumnUnroll * kWarpSize * 4;
constexpr int64_t kWarpColumnsInFlight = int64_t{1} << 20;
constexpr int64_t kMaxPartials = 1024;

// The fused kernel's shared memory at its widest: a row of dweight sums per warp, 64 KB. Twice the
// width would not fit an sm_86/89 block and would leave one block (8 warps) per SM on an H200;
// such rows keep the two-pass path.
constexpr size_t kFusedMaxSharedBytes = kWarpsPerBlock * kRmsNormFusedMaxColumns * sizeof(float);
static_assert(kFusedMaxSharedBytes <= 99 * 1024, "within the opt-in limit of sm_86/89 (99 KB)");

// kWidth consecutive columns per lane and access: 1, or 4 when c % 4 == 0 and the tensors are
// aligned; the row's sums run over each lane's columns, then across the warp.
template <int kWidth, typename In>
__global__ void rmsnorm_forward_kernel(bf16* out, float* rstd, const In* inp, const float* weight,
                                       int64_t n, int64_t c, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= n) return;
  const In* x = inp + row * c;
  float sum_sq = 0.0f;
  for (int64_t j = lane * kWidth; j < c; j += kWarpSize * kWidth) {
    float v[kWidth];
    load_cols<kWidth>(v, x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) sum_sq += v[i] * v[i];
  }
  sum_sq = warp_sum(sum_sq);
  const float r = rsqrtf(sum_sq / static_cast<float>(c) + eps);
  if (lane == 0) rstd[row] = r;
  bf16* y = out + row * c;
  for (int64_t j = lane * kWidth; j < c; j += kWarpSize * kWidth) {
    float v[kWidth], w[kWidth];
    load_cols<kWidth>(v, x + j);
    load_cols<kWidth>(w, weight + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) v[i] = v[i] * r * w[i];
    store_cols<kWidth>(y + j, v);
  }
}

template <typename In, typename DOut, typename DIn>
struct BackwardParams {
  DIn* dinp;        // [n, c]
  bf16* dinp_bf16;  // [n, c] or null
  float* partial;   // [blocks, c]: the fused kernel's partial sums of dweight
  const DOut* dout;
  const In* inp;
  const float* weight;
  const float* rstd;
  int64_t n, c;
  int64_t rows_per_block;
  bool accumulate;
};

// Rows [blockIdx.x * rows_per_block, + rows_per_block), warp w taking rows w, w + kWarpsPerBlock,
// ... of them; widths as in the forward; kUnroll column groups loaded at once in the first pass.
//
// kDweight: also partial[blockIdx.x, j] = sum over the block's rows of dout * inp * rstd. Each
// warp adds its rows' terms into its own row of shared memory ([kWarpsPerBlock, c] floats) in the
// first pass, while it holds dout, inp and rstd (registers cannot hold them for any c: at 2048
// they are 64 floats per lane). A lane touches only the columns it owns, so nothing needs
// synchronising until the block sums the warps' rows, in warp order.
template <int kWidth, int kUnroll, bool kDweight, typename In, typename DOut, typename DIn>
__global__ void rmsnorm_backward_kernel(BackwardParams<In, DOut, DIn> p) {
  constexpr int64_t kGroupColumns = kWarpSize * kWidth;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t c = p.c;
  [[maybe_unused]] float* warp_dweight = reinterpret_cast<float*>(smem) + warp * c;  // [c]
  if constexpr (kDweight) {
    const float zero[kWidth] = {};
    for (int64_t j = lane * kWidth; j < c; j += kGroupColumns) {
      store_cols<kWidth>(warp_dweight + j, zero);
    }
  }
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = min(p.n, row_begin + p.rows_per_block);
  for (int64_t row = row_begin + warp; row < row_end; row += kWarpsPerBlock) {
    const In* x = p.inp + row * c;
    const DOut* dy = p.dout + row * c;
    const float r = p.rstd[row];
    float dot = 0.0f;
#pragma unroll 1  // the kUnroll groups are the unrolling
    for (int64_t j0 = lane * kWidth; j0 < c; j0 += kUnroll * kGroupColumns) {
      float g[kUnroll][kWidth], w[kUnroll][kWidth], v[kUnroll][kWidth];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kGroupColumns;
        if (j < c) {
          load_cols<kWidth>(g[u], dy + j);
          load_cols<kWidth>(w[u], p.weight + j);
          load_cols<kWidth>(v[u], x + j);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kGroupColumns;
        if (j >= c) break;
#pragma unroll
        for (int i = 0; i < kWidth; ++i) dot += g[u][i] * w[u][i] * v[u][i];
        if constexpr (kDweight) {
          float sum[kWidth];
          load_cols<kWidth>(sum, warp_dweight + j);
#pragma unroll
          for (int i = 0; i < kWidth; ++i) sum[i] += g[u][i] * v[u][i] * r;
          store_cols<kWidth>(warp_dweight + j, sum);
        }
      }
    }
    dot = warp_sum(dot);
    const float coeff = r * r * r * dot / static_cast<float>(c);
    DIn* dx = p.dinp + row * c;
    for (int64_t j = lane * kWidth; j < c; j += kGroupColumns) {
      float g[kWidth], w[kWidth], v[kWidth], result[kWidth];
      load_cols<kWidth>(g, dy + j);
      load_cols<kWidth>(w, p.weight + j);
      load_cols<kWidth>(v, x + j);
      float prior[kWidth] = {};
      if (p.accumulate) load_cols<kWidth>(prior, dx + j);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) result[i] = r * w[i] * g[i] - coeff * v[i] + prior[i];
      store_cols<kWidth>(dx + j, result);
      if (p.dinp_bf16 != nullptr) store_cols<kWidth>(p.dinp_bf16 + row * c + j, result);
    }
  }
  if constexpr (kDweight) {
    __syncthreads();  // every warp's sums are complete
    const float* block_dweight = reinterpret_cast<const float*>(smem);  // [kWarpsPerBlock, c]
    for (int64_t j = threadIdx.x; j < c; j += kThreadsPerBlock) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarpsPerBlock; ++w) sum += block_dweight[w * c + j];
      p.partial[blockIdx.x * c + j] = sum;
    }
  }
}

// The two-pass path: partial[chunk, j] = sum over the chunk's rows of dout * inp * rstd (column j).
template <typename In, typename DOut>
__global__ void rmsnorm_dweight_partial_kernel(float* partial, const DOut* dout, const In* inp,
                                               const float* rstd, int64_t n, int64_t c) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (j >= c) return;
  const int64_t row_end = min(n, (chunk + 1) * kRowsPerChunk);
  float sum = 0.0f;
  for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
    sum += to_float(dout[row * c + j]) * to_float(inp[row * c + j]) * rstd[row];
  }
  partial[chunk * c + j] = sum;
}

template <int kWidth, int kUnroll, bool kDweight, typename In, typename DOut, typename DIn>
void launch_backward_kernel(const BackwardParams<In, DOut, DIn>& p, cudaStream_t stream) {
  const auto kernel = rmsnorm_backward_kernel<kWidth, kUnroll, kDweight, In, DOut, DIn>;
  const auto blocks = static_cast<unsigned>(ceil_div(p.n, p.rows_per_block));
  const size_t smem_bytes = kDweight ? kWarpsPerBlock * p.c * sizeof(float) : 0;
  if constexpr (kDweight) {
    MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem_bytes)));
  }
  kernel<<<blocks, kThreadsPerBlock, smem_bytes, stream>>>(p);
  MF_CUDA_CHECK_LAUNCH();
}

// Rows wider than the fused kernel holds always have kColumnUnroll groups per lane.
static_assert(kRmsNormFusedMaxColumns >= kColumnUnroll * kWarpSize * 4);

template <int kWidth, bool kDweight, typename In, typename DOut, typename DIn>
void launch_backward(const BackwardParams<In, DOut, DIn>& p, cudaStream_t stream) {
  if constexpr (kDweight) {
    if (p.c < kColumnUnroll * kWarpSize * kWidth) {
      launch_backward_kernel<kWidth, 1, true>(p, stream);
      return;
    }
  }
  launch_backward_kernel<kWidth, kColumnUnroll, kDweight>(p, stream);
}

}  // namespace

RmsNormDweightSplit rmsnorm_dweight_split(int64_t n, int64_t c) {
  if (c > kRmsNormFusedMaxColumns) return {false, kRowsPerChunk, ceil_div(n, kRowsPerChunk)};
  const int64_t warp_columns_in_flight = std::clamp<int64_t>(c, 1, kColumnsInFlightPerWarp);
  const int64_t max_blocks =
      std::min(kMaxPartials, kWarpColumnsInFlight / (kWarpsPerBlock * warp_columns_in_flight));
  const int64_t rows_per_warp = std::max<int64_t>(1, ceil_div(n, kWarpsPerBlock * max_blocks));
  const int64_t rows_per_block = kWarpsPerBlock * rows_per_warp;
  return {true, rows_per_block, ceil_div(n, rows_per_block)};
}

template <typename In>
void rmsnorm_forward(bf16* out, float* rstd, const In* inp, const float* weight, int64_t n,
                     int64_t c, float eps, cudaStream_t stream) {
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(ceil_div(n, kWarpsPerBlock));
  if (c % 4 == 0 && aligned_to(16, out, inp, weight)) {
    rmsnorm_forward_kernel<4>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(out, rstd, inp, weight, n, c, eps);
  } else {
    rmsnorm_forward_kernel<1>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(out, rstd, inp, weight, n, c, eps);
  }
  MF_CUDA_CHECK_LAUNCH();
}

template <typename In, typename DOut, typename DIn>
void rmsnorm_backward(DIn* dinp, float* dweight, const DOut* dout, const In* inp,
                      const float* weight, const float* rstd, int64_t n, int64_t c, bool accumulate,
                      cudaStream_t stream, bf16* dinp_bf16) {
  if (n == 0) return;
  const RmsNormDweightSplit split = rmsnorm_dweight_split(n, c);
  DeviceBuffer<float> partial(static_cast<size_t>(split.num_partials * c));
  const bool vectorised =
      c % 4 == 0 && aligned_to(16, dinp, dout, inp, weight) && aligned_to(8, dinp_bf16);
  const int64_t rows_per_block = split.fused ? split.rows_per_partial : kWarpsPerBlock;
  const BackwardParams<In, DOut, DIn> p{
      dinp, dinp_bf16, partial.data(), dout, inp, weight, rstd, n, c, rows_per_block, accumulate};
  if (split.fused && vectorised) {
    launch_backward<4, true>(p, stream);
  } else if (split.fused) {
    launch_backward<1, true>(p, stream);
  } else {
    // One row per warp; then a second kernel reads dout and inp again for dweight.
    if (vectorised) {
      launch_backward<4, false>(p, stream);
    } else {
      launch_backward<1, false>(p, stream);
    }
    constexpr int kThreads = 256;
    const dim3 grid(static_cast<unsigned>(ceil_div(c, kThreads)),
                    static_cast<unsigned>(split.num_partials));
    rmsnorm_dweight_partial_kernel<<<grid, kThreads, 0, stream>>>(partial.data(), dout, inp, rstd,
                                                                  n, c);
    MF_CUDA_CHECK_LAUNCH();
  }
  accumulate_chunk_sums(dweight, partial.data(), split.num_partials, c, stream);
}

template void rmsnorm_forward<float>(bf16*, float*, const float*, const float*, int64_t, int64_t,
                                     float, cudaStream_t);
template void rmsnorm_forward<bf16>(bf16*, float*, const bf16*, const float*, int64_t, int64_t,
                                    float, cudaStream_t);
template void rmsnorm_backward<float, float, float>(float*, float*, const float*, const float*,
                                                    const float*, const float*, int64_t, int64_t,
                                                    bool, cudaStream_t, bf16*);
template void rmsnorm_backward<bf16, bf16, bf16>(bf16*, float*, const bf16*, const bf16*,
                                                 const float*, const float*, int64_t, int64_t, bool,
                                                 cudaStream_t, bf16*);

}  // namespace moeforge::cuda
