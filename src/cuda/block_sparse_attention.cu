// Block-sparse causal attention on the GPU (see block_sparse_attention.h): the checks, the choice
// of kernel, and the portable kernel. One block of
// 8 warps per (query head, 64 query rows); each warp owns 8 rows, each lane two keys of a 64-key
// tile for the scores and head_dim / 32 output dimensions. Tiles of q and k live in shared memory
// with an odd row stride in 32-bit words, so lanes reading different keys hit different banks.
// Scores are kept in log2 units (scale * log2 e), as exp2 is what the hardware computes.
#include <cmath>

#include "core/error.h"
#include "cuda/block_sparse_attention.h"
#include "cuda/block_sparse_attention_kernels.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kRows = 64;  // query rows per block of threads
constexpr int kWarps = 8;
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kKeys = 64;  // keys per shared-memory tile (two per lane)
constexpr int kMaxHeadDim = 256;
constexpr int kDimsPerLane = kMaxHeadDim / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

struct KernelArgs {
  BlockSparseLaunch base;
  int qk_stride;  // elements per shared-memory row of q and k (even, odd in 32-bit words)
};

__global__ void __launch_bounds__(kWarps * 32) block_sparse_attention_kernel(KernelArgs args) {
  const BlockSparseLaunch& a = args.base;
  const int qk_stride = args.qk_stride;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* q_tile = reinterpret_cast<bf16*>(smem);  // [kRows, qk_stride]
  bf16* k_tile = q_tile + kRows * qk_stride;     // [kKeys, qk_stride]
  bf16* v_tile = k_tile + kKeys * qk_stride;     // [kKeys, head_dim]
  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (a.num_q_heads / a.num_kv_heads);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int d = a.head_dim;
  const int64_t q_row_stride = static_cast<int64_t>(a.num_q_heads) * d;
  const int64_t kv_row_stride = static_cast<int64_t>(a.num_kv_heads) * d;
  const bf16 zero = __float2bfloat16(0.0f);

  for (int idx = static_cast<int>(threadIdx.x); idx < kRows * qk_stride; idx += blockDim.x) {
    const int r = idx / qk_stride, c = idx % qk_stride;
    const int64_t pos = row0 + r;
    q_tile[idx] = pos < a.seq_len && c < d ? a.q[pos * q_row_stride + head * d + c] : zero;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] = 0.0f;
  }

  const int64_t last_pos = min(row0 + kRows, a.seq_len) - 1;  // last query row of this block
  const int64_t csr_row = head * a.num_blocks + row0 / a.block_size;
  const int64_t begin = a.row_offsets[csr_row], end = a.row_offsets[csr_row + 1];
  const int pairs = qk_stride / 2;
  for (int64_t e = begin; e < end; ++e) {
    const int64_t key_begin = static_cast<int64_t>(a.col_idx[e]) * a.block_size;
    const int64_t key_end = min(key_begin + a.block_size, a.seq_len);
    // Tiles that start after this block's last row are fully masked.
    for (int64_t t0 = key_begin; t0 < key_end && t0 <= last_pos; t0 += kKeys) {
      __syncthreads();  // the previous tile is consumed (and, the first time, q is written)
      for (int idx = static_cast<int>(threadIdx.x); idx < kKeys * qk_stride; idx += blockDim.x) {
        const int j = idx / qk_stride, c = idx % qk_stride;
        const int64_t key = t0 + j;
        k_tile[idx] = key < key_end && c < d ? a.k[key * kv_row_stride + kv_head * d + c] : zero;
      }
      for (int idx = static_cast<int>(threadIdx.x); idx < kKeys * d; idx += blockDim.x) {
        const int j = idx / d, c = idx % d;
        const int64_t key = t0 + j;
        v_tile[idx] = key < key_end ? a.v[key * kv_row_stride + kv_head * d + c] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp * kRowsPerWarp + i;
        const int64_t pos = row0 + r;
        if (pos >= a.seq_len) continue;  // the same for the whole warp
        float s[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int j = lane + 32 * half;
          const int64_t key = t0 + j;
          s[half] = -INFINITY;
          if (key < key_end && key <= pos) {
            const auto* qr = reinterpret_cast<const __nv_bfloat162*>(q_tile + r * qk_stride);
            const auto* kr = reinterpret_cast<const __nv_bfloat162*>(k_tile + j * qk_stride);
            float dot = 0.0f;
            for (int p = 0; p < pairs; ++p) {
              const float2 x = __bfloat1622float2(qr[p]), y = __bfloat1622float2(kr[p]);
              dot = fmaf(x.x, y.x, dot);
              dot = fmaf(x.y, y.y, dot);
            }
            s[half] = dot * a.scale_log2;
          }
        }
        const float tile_max = warp_max(fmaxf(s[0], s[1]));
        if (tile_max == -INFINITY) continue;  // every key of the tile is masked for this row
        const float m_new = fmaxf(m[i], tile_max);
        const float correction = exp2f(m[i] - m_new);
        const float p0 = exp2f(s[0] - m_new), p1 = exp2f(s[1] - m_new);
        l[i] = l[i] * correction + warp_sum(p0 + p1);
#pragma unroll
        for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] *= correction;
        for (int j = 0; j < kKeys; ++j) {
          const float pj = __shfl_sync(kFullMask, j < 32 ? p0 : p1, j & 31);
          const bf16* vr = v_tile + j * d;
#pragma unroll
          for (int c = 0; c < kDimsPerLane; ++c) {
            const int dim = lane + 32 * c;
            if (dim < d) acc[i][c] = fmaf(pj, __bfloat162float(vr[dim]), acc[i][c]);
          }
        }
        m[i] = m_new;
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t pos = row0 + warp * kRowsPerWarp + i;
    if (pos >= a.seq_len) continue;
    // l > 0: every row lists its diagonal block, which holds the row's own key.
    const float inv = 1.0f / l[i];
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int dim = lane + 32 * c;
      if (dim < d)
        a.out[pos * q_row_stride + head * d + dim] = __float2bfloat16_rn(acc[i][c] * inv);
    }
    if (a.lse != nullptr && lane == 0) {
      a.lse[head * a.seq_len + pos] = (m[i] + log2f(l[i])) * 0.69314718055994531f;
    }
  }
}

void launch_portable(const BlockSparseLaunch& base, cudaStream_t stream) {
  int stride_words = (base.head_dim + 1) / 2;
  if (stride_words % 2 == 0) ++stride_words;
  const KernelArgs args{base, 2 * stride_words};
  const size_t smem =
      static_cast<size_t>((kRows + kKeys) * args.qk_stride + kKeys * base.head_dim) * sizeof(bf16);
  MF_CUDA_CHECK(cudaFuncSetAttribute(block_sparse_attention_kernel,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(ceil_div(base.seq_len, kRows)),
                  static_cast<unsigned>(base.num_q_heads));
  block_sparse_attention_kernel<<<grid, kWarps * 32, smem, stream>>>(args);
  MF_CUDA_CHECK_LAUNCH();
}

int current_device_major() {
  int device = 0, major = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

}  // namespace

DeviceBlockSparseLayoutBuffers upload_layout(const ops::BlockSparseLayout& layout) {
  DeviceBlockSparseLayoutBuffers out;
  out.row_offsets.upload(layout.row_offsets);
  out.col_idx.upload(layout.col_idx);
  out.num_heads = layout.num_heads;
  out.num_blocks = layout.num_blocks;
  out.block_size = layout.block_size;
  return out;
}

void block_sparse_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k,
                                    const bf16* v, const DeviceBlockSparseLayout& layout,
                                    const ops::SparseAttentionDims& dims, cudaStream_t stream,
                                    BlockSparseKernel kernel) {
  const char* what = "block-sparse attention (CUDA)";
  ops::check_sparse_attention_dims(dims, what);
  MF_CHECK(dims.head_dim <= kMaxHeadDim, "{}: head_dim {} is above the kernel's limit {}", what,
           dims.head_dim, kMaxHeadDim);
  MF_CHECK(layout.block_size > 0 && layout.block_size % kRows == 0,
           "{}: block_size must be a positive multiple of {}, got {}", what, kRows,
           layout.block_size);
  const int64_t num_blocks = ceil_div(dims.seq_len, layout.block_size);
  MF_CHECK(layout.num_heads == dims.num_q_heads && layout.num_blocks == num_blocks,
           "{}: layout is for {} heads x {} blocks, expected {} heads x {} blocks", what,
           layout.num_heads, layout.num_blocks, dims.num_q_heads, num_blocks);
  if (dims.seq_len == 0) return;
  const BlockSparseLaunch args{
      out,
      lse,
      q,
      k,
      v,
      layout.row_offsets,
      layout.col_idx,
      layout.num_blocks,
      layout.block_size,
      dims.seq_len,
      static_cast<int>(dims.num_q_heads),
      static_cast<int>(dims.num_kv_heads),
      static_cast<int>(dims.head_dim),
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(dims.head_dim)) * M_LOG2E)};
  const int major = current_device_major();
  const bool hopper_runs = hopper_block_sparse_attention_runs(args, major);
  const bool tensor_core_runs = tensor_core_block_sparse_attention_runs(args, major);
  MF_CHECK(kernel != BlockSparseKernel::hopper || hopper_runs,
           "{}: the Hopper kernel needs an sm_90 GPU, head_dim 64 or 128 and 16-byte aligned "
           "tensors "
           "(head_dim {})",
           what, dims.head_dim);
  MF_CHECK(kernel != BlockSparseKernel::tensor_core || tensor_core_runs,
           "{}: the tensor-core kernel needs sm_80 or later, head_dim 64 or 128 and 16-byte "
           "aligned tensors (head_dim {})",
           what, dims.head_dim);
  const bool automatic = kernel == BlockSparseKernel::automatic;
  if (kernel == BlockSparseKernel::hopper || (automatic && hopper_runs)) {
    launch_hopper_block_sparse_attention(args, stream);
  } else if (kernel == BlockSparseKernel::tensor_core || (automatic && tensor_core_runs)) {
    launch_tensor_core_block_sparse_attention(args, stream);
  } else {
    launch_portable(args, stream);
  }
}

}  // namespace moeforge::cuda
