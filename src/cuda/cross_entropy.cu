// Cross-entropy kernel: one block per row; an online max/sum pass (one exp per logit), then the
// gradient pass; 4 logits per access where the vocabulary allows.
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
                                     const int32_t* targets, int64_t vocab, float dscale) {
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

}  // namespace

void cross_entropy_forward_backward(float* losses, bf16* dlogits, const float* logits,
                                    const int32_t* targets, int64_t rows, int64_t vocab,
                                    float dscale, cudaStream_t stream) {
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>(rows);
  if (vocab % 4 == 0 && aligned_to(16, logits, dlogits)) {
    cross_entropy_kernel<4>
        <<<blocks, kThreads, 0, stream>>>(losses, dlogits, logits, targets, vocab, dscale);
  } else {
    cross_entropy_kernel<1>
        <<<blocks, kThreads, 0, stream>>>(losses, dlogits, logits, targets, vocab, dscale);
  }
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
