// Router kernels: one warp per token holds the token's expert logits in registers (up to
// kMaxExpertsPerLane per lane); the loss reductions run in a fixed order.
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"
#include "cuda/router.h"

namespace moeforge::cuda {
namespace {

constexpr int kMaxExpertsPerLane = 8;  // 256 experts
constexpr int kMaxTopK = 8;
constexpr int kWarpsPerBlock = 8;

struct TokenLogits {
  float v[kMaxExpertsPerLane];
};

__device__ __forceinline__ void load_logits(TokenLogits& l, const float* logits, int64_t e_count,
                                            int lane) {
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int64_t e = lane + i * kWarpSize;
    l.v[i] = e < e_count ? logits[e] : -INFINITY;
  }
}

// max and log-sum-exp over the token's experts.
__device__ __forceinline__ void logsumexp(const TokenLogits& l, float& max_out, float& sum_out) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) m = fmaxf(m, l.v[i]);
  m = warp_max(m);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) s += l.v[i] == -INFINITY ? 0.0f : expf(l.v[i] - m);
  max_out = m;
  sum_out = warp_sum(s);
}

__global__ void router_forward_kernel(float* probs, int32_t* expert_idx, float* gates,
                                      const float* logits, int64_t n, int64_t num_experts,
                                      int64_t top_k, bool norm_topk_prob) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= n) return;
  TokenLogits l;
  load_logits(l, logits + t * num_experts, num_experts, lane);
  float m, s;
  logsumexp(l, m, s);
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int64_t e = lane + i * kWarpSize;
    if (e < num_experts) probs[t * num_experts + e] = expf(l.v[i] - m) / s;
  }
  // Top-k on the logits: the largest value, ties toward the lower expert index.
  bool taken[kMaxExpertsPerLane] = {};
  float selected_p[kMaxTopK];
  int32_t selected_e[kMaxTopK];
  float selected_sum = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) {
    float best = -INFINITY;
    int32_t best_e = INT32_MAX;
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      const int32_t e = lane + i * kWarpSize;
      if (e < num_experts && !taken[i] && (l.v[i] > best || (l.v[i] == best && e < best_e))) {
        best = l.v[i];
        best_e = e;
      }
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int32_t other_e = __shfl_xor_sync(0xffffffffu, best_e, offset);
      if (other > best || (other == best && other_e < best_e)) {
        best = other;
        best_e = other_e;
      }
    }
    if (best_e % kWarpSize == lane) taken[best_e / kWarpSize] = true;
    selected_e[j] = best_e;
    selected_p[j] = expf(best - m) / s;
    selected_sum += selected_p[j];
  }
  if (lane == 0) {
    for (int64_t j = 0; j < top_k; ++j) {
      expert_idx[t * top_k + j] = selected_e[j];
      gates[t * top_k + j] = norm_topk_prob ? selected_p[j] / selected_sum : selected_p[j];
    }
  }
}

constexpr int64_t kTokensPerChunk = 128;

// partial[chunk, e] = sum over the chunk's tokens of probs[t, e] (rows read whole, coalesced).
__global__ void prob_chunk_sum_kernel(float* partial, const float* probs, int64_t n,
                                      int64_t num_experts) {
  const int64_t chunk = blockIdx.x;
  const int64_t end = min(n, (chunk + 1) * kTokensPerChunk);
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    float sum = 0.0f;
    for (int64_t t = chunk * kTokensPerChunk; t < end; ++t) sum += probs[t * num_experts + e];
    partial[chunk * num_experts + e] = sum;
  }
}

// scratch[e] = sum of the chunks' partial sums, in chunk order.
__global__ void prob_column_sum_kernel(float* scratch, const float* partial, int64_t num_chunks,
                                       int64_t num_experts) {
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    float sum = 0.0f;
    for (int64_t c = 0; c < num_chunks; ++c) sum += partial[c * num_experts + e];
    scratch[e] = sum;
  }
}

// scratch[t] = logsumexp(logits[t])^2.
__global__ void z_term_kernel(float* scratch, const float* logits, int64_t n, int64_t num_experts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= n) return;
  TokenLogits l;
  load_logits(l, logits + t * num_experts, num_experts, lane);
  float m, s;
  logsumexp(l, m, s);
  const float lse = m + logf(s);
  if (lane == 0) scratch[t] = lse * lse;
}

// One block: expert counts, then aux = E * sum_e f_e P_e and z = mean z terms.
__global__ void router_losses_kernel(float* losses, int32_t* expert_counts, const float* scratch,
                                     const int32_t* expert_idx, int64_t n, int64_t num_experts,
                                     int64_t top_k) {
  __shared__ int32_t counts[kMaxExpertsPerLane * kWarpSize];
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t a = threadIdx.x; a < n * top_k; a += blockDim.x)
    atomicAdd(&counts[expert_idx[a]], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) expert_counts[e] = counts[e];
  float z = 0.0f;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) z += scratch[num_experts + t];
  __shared__ float partial[kWarpsPerBlock];
  z = warp_sum(z);
  if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = z;
  __syncthreads();
  if (threadIdx.x == 0) {
    float z_total = 0.0f;
    for (int w = 0; w < kWarpsPerBlock; ++w) z_total += partial[w];
    double aux = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const double f = static_cast<double>(counts[e]) / static_cast<double>(n * top_k);
      aux += f * static_cast<double>(scratch[e]) / static_cast<double>(n);
    }
    losses[0] = static_cast<float>(aux * static_cast<double>(num_experts));
    losses[1] = z_total / static_cast<float>(n);
  }
}

__global__ void router_backward_kernel(bf16* dlogits, const float* dgates, const float* logits,
                                       const float* probs, const int32_t* expert_idx,
                                       const int32_t* expert_counts, float d_aux, float d_z,
                                       int64_t n, int64_t num_experts, int64_t top_k,
                                       bool norm_topk_prob) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= n) return;
  const float* p = probs + t * num_experts;
  const int32_t* idx = expert_idx + t * top_k;
  const float* dg = dgates + t * top_k;
  const float aux_scale = d_aux * static_cast<float>(num_experts) /
                          (static_cast<float>(n) * static_cast<float>(n * top_k));
  float dprobs[kMaxExpertsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int64_t e = lane + i * kWarpSize;
    dprobs[i] = e < num_experts ? aux_scale * static_cast<float>(expert_counts[e]) : 0.0f;
  }
  float selected_sum = 0.0f, weighted = 0.0f;
  if (norm_topk_prob) {
    for (int64_t j = 0; j < top_k; ++j) selected_sum += p[idx[j]];
    for (int64_t j = 0; j < top_k; ++j) weighted += dg[j] * p[idx[j]] / selected_sum;
  }
  for (int64_t j = 0; j < top_k; ++j) {
    const int32_t e = idx[j];
    if (e % kWarpSize == lane) {
      dprobs[e / kWarpSize] += norm_topk_prob ? (dg[j] - weighted) / selected_sum : dg[j];
    }
  }
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int64_t e = lane + i * kWarpSize;
    if (e < num_experts) dot += dprobs[i] * p[e];
  }
  dot = warp_sum(dot);
  float z_scale = 0.0f;
  if (d_z != 0.0f) {
    TokenLogits l;
    load_logits(l, logits + t * num_experts, num_experts, lane);
    float m, s;
    logsumexp(l, m, s);
    z_scale = d_z * 2.0f * (m + logf(s)) / static_cast<float>(n);
  }
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int64_t e = lane + i * kWarpSize;
    if (e < num_experts) {
      dlogits[t * num_experts + e] = __float2bfloat16_rn(p[e] * (dprobs[i] - dot) + z_scale * p[e]);
    }
  }
}

void check_shape(const RouterShape& shape) {
  MF_CHECK(shape.num_experts > 0 && shape.num_experts <= kMaxExpertsPerLane * kWarpSize,
           "CUDA router supports 1 to {} experts, got {}", kMaxExpertsPerLane * kWarpSize,
           shape.num_experts);
  MF_CHECK(shape.top_k > 0 && shape.top_k <= kMaxTopK && shape.top_k <= shape.num_experts,
           "CUDA router supports top-k from 1 to min({}, num_experts), got {}", kMaxTopK,
           shape.top_k);
}

unsigned token_blocks(int64_t n) {
  return static_cast<unsigned>(ceil_div(n, kWarpsPerBlock));
}

}  // namespace

void router_forward(float* probs, int32_t* expert_idx, float* gates, const float* logits,
                    const RouterShape& shape, cudaStream_t stream) {
  check_shape(shape);
  if (shape.num_tokens == 0) return;
  router_forward_kernel<<<token_blocks(shape.num_tokens), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      probs, expert_idx, gates, logits, shape.num_tokens, shape.num_experts, shape.top_k,
      shape.norm_topk_prob);
  MF_CUDA_CHECK_LAUNCH();
}

int64_t router_loss_scratch_floats(const RouterShape& shape) {
  return shape.num_experts + shape.num_tokens;
}

void router_losses(float* losses, int32_t* expert_counts, float* scratch, const float* probs,
                   const int32_t* expert_idx, const float* logits, const RouterShape& shape,
                   cudaStream_t stream) {
  check_shape(shape);
  MF_CHECK(shape.num_tokens > 0, "router losses need at least one token");
  constexpr int kThreads = kWarpsPerBlock * kWarpSize;
  const int64_t num_chunks = ceil_div(shape.num_tokens, kTokensPerChunk);
  DeviceBuffer<float> partial(static_cast<size_t>(num_chunks * shape.num_experts));
  prob_chunk_sum_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
      partial.data(), probs, shape.num_tokens, shape.num_experts);
  MF_CUDA_CHECK_LAUNCH();
  prob_column_sum_kernel<<<1, kThreads, 0, stream>>>(scratch, partial.data(), num_chunks,
                                                     shape.num_experts);
  MF_CUDA_CHECK_LAUNCH();
  z_term_kernel<<<token_blocks(shape.num_tokens), kThreads, 0, stream>>>(
      scratch + shape.num_experts, logits, shape.num_tokens, shape.num_experts);
  MF_CUDA_CHECK_LAUNCH();
  router_losses_kernel<<<1, kThreads, 0, stream>>>(
      losses, expert_counts, scratch, expert_idx, shape.num_tokens, shape.num_experts, shape.top_k);
  MF_CUDA_CHECK_LAUNCH();
}

void router_backward(bf16* dlogits, const float* dgates, const float* logits, const float* probs,
                     const int32_t* expert_idx, const int32_t* expert_counts, float d_aux,
                     float d_z, const RouterShape& shape, cudaStream_t stream) {
  check_shape(shape);
  if (shape.num_tokens == 0) return;
  router_backward_kernel<<<token_blocks(shape.num_tokens), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      dlogits, dgates, logits, probs, expert_idx, expert_counts, d_aux, d_z, shape.num_tokens,
      shape.num_experts, shape.top_k, shape.norm_topk_prob);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
