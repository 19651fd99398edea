// Cross-entropy kernels, one block per row. Vocabularies up to kMaxResidentVocab (a multiple of 4,
// aligned tensors): the row is read once into registers (float4 per access), then max, sum of
// exponentials and the gradient come from the registers, one exp per logit. Larger or odd
// vocabularies: an online max/sum pass (one exp per logit), then the gradient pass reading the row
// again; 4 logits per access where the vocabulary allows.
#include "cuda/cross_entropy.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;

__device__ __forceinline__ void merge_online(float& m, float& s, float other_m, float other_s) {
  const float new_m = fmaxf(m, other_m);
  if (new_m == -INFINITY) return;
  s = s * expf(m - new_m) + other_s * expf(other_m - new_m);
  m = new_m;
}

// Adds one logit to a thread's running (max, sum) with a single exp.
__device__ __forceinline__ void add_logit(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

// kWidth consecutive logits per thread and access: 1, or 4 (float4 in, 8-byte bf16 out) when the
// vocabulary is a multiple of 4 and the tensors are aligned.
template <int kWidth>
__global__ void cross_entropy_kernel(float* losses, bf16* dlogits, const float* logits,
                                     const int32_t* targets, int64_t vocab,
                                     const float* dscale_ptr) {
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  const int32_t target = targets[row];
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = threadIdx.x * kWidth; j < vocab; j += kThreads * kWidth) {
    float v[kWidth];
    load_cols<kWidth>(v, x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) add_logit(m, s, v[i]);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_m = __shfl_xor_sync(0xffffffffu, m, offset);
    const float other_s = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_online(m, s, other_m, other_s);
  }
  __shared__ float shared_m[kWarps], shared_s[kWarps];
  __shared__ float lse_shared;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = shared_m[0], bs = shared_s[0];
    for (int w = 1; w < kWarps; ++w) merge_online(bm, bs, shared_m[w], shared_s[w]);
    lse_shared = bm + logf(bs);
    losses[row] = target < 0 ? 0.0f : lse_shared - x[target];
  }
  __syncthreads();
  if (dlogits == nullptr) return;
  const float dscale = *dscale_ptr;
  const float lse = lse_shared;
  bf16* dx = dlogits + row * vocab;
  for (int64_t j = threadIdx.x * kWidth; j < vocab; j += kThreads * kWidth) {
    float v[kWidth];
    load_cols<kWidth>(v, x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      v[i] = target < 0 ? 0.0f : (expf(v[i] - lse) - (j + i == target ? 1.0f : 0.0f)) * dscale;
    }
    store_cols<kWidth>(dx + j, v);
  }
}

// kChunks float4 per thread hold a whole row (kThreads * 4 * kChunks >= vocab; past the end:
// -inf, exp 0). Needs vocab % 4 == 0 and 16-byte aligned logits and 8-byte aligned dlogits.
template <int kChunks>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_resident_kernel(float* losses, bf16* dlogits, const float* logits,
                                  const int32_t* targets, int64_t vocab, const float* dscale_ptr) {
  __shared__ float shared[kWarps];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  const int32_t target = targets[row];
  float v[kChunks][4];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t j = (static_cast<int64_t>(c) * kThreads + threadIdx.x) * 4;
    if (j < vocab) {
      load_cols<4>(v[c], x + j);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[c][i] = -INFINITY;
    }
  }
  float m = -INFINITY;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) m = fmaxf(m, v[c][i]);
  }
  m = block_reduce<true, kThreads>(m, shared);
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[c][i] = expf(v[c][i] - m);
      s += v[c][i];
    }
  }
  s = block_reduce<false, kThreads>(s, shared);
  if (threadIdx.x == 0) losses[row] = target < 0 ? 0.0f : m + logf(s) - x[target];
  if (dlogits == nullptr) return;
  const float dscale = *dscale_ptr;
  const float scale = dscale / s;
  bf16* dx = dlogits + row * vocab;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t j = (static_cast<int64_t>(c) * kThreads + threadIdx.x) * 4;
    if (j >= vocab) continue;
    float g[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      g[i] = target < 0 ? 0.0f : v[c][i] * scale - (j + i == target ? dscale : 0.0f);
    }
    store_cols<4>(dx + j, g);
  }
}

constexpr int64_t kMaxResidentChunks = 16;
constexpr int64_t kMaxResidentVocab = kThreads * 4 * kMaxResidentChunks;  // 32768

// The smallest kChunks (a power of two) whose row covers vocab.
template <int kChunks>
void launch_resident(float* losses, bf16* dlogits, const float* logits, const int32_t* targets,
                     int64_t rows, int64_t vocab, const float* dscale, cudaStream_t stream) {
  if constexpr (kChunks < kMaxResidentChunks) {
    if (vocab > int64_t{kThreads} * 4 * kChunks) {
      launch_resident<kChunks * 2>(losses, dlogits, logits, targets, rows, vocab, dscale, stream);
      return;
    }
  }
  cross_entropy_resident_kernel<kChunks><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      losses, dlogits, logits, targets, vocab, dscale);
}

}  // namespace

void cross_entropy_forward_backward(float* losses, bf16* dlogits, const float* logits,
                                    const int32_t* targets, int64_t rows, int64_t vocab,
                                    const float* dscale, cudaStream_t stream) {
  if (rows == 0) return;
  MF_CHECK(dlogits == nullptr || dscale != nullptr,
           "cross-entropy: a gradient needs its scale (a device float)");
  const auto blocks = static_cast<unsigned>(rows);
  if (vocab % 4 == 0 && vocab <= kMaxResidentVocab && aligned_to(16, logits, dlogits)) {
    launch_resident<1>(losses, dlogits, logits, targets, rows, vocab, dscale, stream);
  } else if (vocab % 4 == 0 && aligned_to(16, logits, dlogits)) {
    cross_entropy_kernel<4>
        <<<blocks, kThreads, 0, stream>>>(losses, dlogits, logits, targets, vocab, dscale);
  } else {
    cross_entropy_kernel<1>
        <<<blocks, kThreads, 0, stream>>>(losses, dlogits, logits, targets, vocab, dscale);
  }
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
