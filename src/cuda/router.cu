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

// One block per chunk of kTokensPerChunk tokens, in fixed orders: prob_sums[chunk, e] = sum of
// probs[t, e] (rows read whole, coalesced), counts[chunk, e] = assignments to e, z_sums[chunk] =
// sum of the z terms (lane i sums tokens i, i + 32, ..., then the warp's fixed butterfly).
__global__ void router_chunk_kernel(float* prob_sums, int32_t* counts, float* z_sums,
                                    const float* probs, const int32_t* expert_idx,
                                    const float* z_terms, int64_t n, int64_t num_experts,
                                    int64_t top_k) {
  __shared__ int32_t chunk_counts[kMaxExpertsPerLane * kWarpSize];
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kTokensPerChunk, end = min(n, begin + kTokensPerChunk);
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    chunk_counts[e] = 0;
    float sum = 0.0f;
    for (int64_t t = begin; t < end; ++t) sum += probs[t * num_experts + e];
    prob_sums[chunk * num_experts + e] = sum;
  }
  __syncthreads();
  for (int64_t a = begin * top_k + threadIdx.x; a < end * top_k; a += blockDim.x) {
    atomicAdd(&chunk_counts[expert_idx[a]], 1);
  }
  if (threadIdx.x < kWarpSize) {
    float z = 0.0f;
    for (int64_t t = begin + threadIdx.x; t < end; t += kWarpSize) z += z_terms[t];
    z = warp_sum(z);
    if (threadIdx.x == 0) z_sums[chunk] = z;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    counts[chunk * num_experts + e] = chunk_counts[e];
  }
}

// One block: the chunks' sums in chunk order into sums [E + 1] (the probs per expert, then the z
// terms) and expert_counts [E].
__global__ void router_totals_kernel(float* sums, int32_t* expert_counts, const float* prob_sums,
                                     const int32_t* counts, const float* z_sums, int64_t num_chunks,
                                     int64_t num_experts) {
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    float sum = 0.0f;
    int32_t count = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      sum += prob_sums[c * num_experts + e];
      count += counts[c * num_experts + e];
    }
    sums[e] = sum;
    expert_counts[e] = count;
  }
  if (threadIdx.x == 0) {
    float z_total = 0.0f;
    for (int64_t c = 0; c < num_chunks; ++c) z_total += z_sums[c];
    sums[num_experts] = z_total;
  }
}

// One thread: aux = G * sum_g f_g P_g (G groups of num_experts / G experts; G = num_experts: per
// expert) and z = mean z terms, over n tokens.
__global__ void router_losses_kernel(float* losses, const float* sums, const int32_t* expert_counts,
                                     int64_t n, int64_t num_experts, int64_t top_k,
                                     int64_t groups) {
  double aux = 0.0;
  const int64_t size = num_experts / groups;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t count = 0;
    double prob_sum = 0.0;
    for (int64_t e = g * size; e < (g + 1) * size; ++e) {
      count += expert_counts[e];
      prob_sum += static_cast<double>(sums[e]);
    }
    const double f = static_cast<double>(count) / static_cast<double>(n * top_k);
    aux += f * prob_sum / static_cast<double>(n);
  }
  losses[0] = static_cast<float>(aux * static_cast<double>(groups));
  losses[1] = sums[num_experts] / static_cast<float>(n);
}

__global__ void router_backward_kernel(bf16* dlogits, const float* dgates, const float* logits,
                                       const float* probs, const int32_t* expert_idx,
                                       const int32_t* expert_counts, float d_aux, float d_z,
                                       int64_t n, int64_t loss_n, int64_t num_experts,
                                       int64_t top_k, int64_t groups, bool norm_topk_prob) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= n) return;
  const float* p = probs + t * num_experts;
  const int32_t* idx = expert_idx + t * top_k;
  const float* dg = dgates + t * top_k;
  // The losses average over loss_n tokens (the group's under the all-to-all dispatch).
  const float aux_scale = d_aux * static_cast<float>(groups) /
                          (static_cast<float>(loss_n) * static_cast<float>(loss_n * top_k));
  const int64_t size = num_experts / groups;
  float dprobs[kMaxExpertsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int64_t e = lane + i * kWarpSize;
    // The assignments to e's balance group.
    int32_t count = 0;
    if (e < num_experts) {
      for (int64_t j = e / size * size; j < (e / size + 1) * size; ++j) count += expert_counts[j];
    }
    dprobs[i] = aux_scale * static_cast<float>(count);
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
    z_scale = d_z * 2.0f * (m + logf(s)) / static_cast<float>(loss_n);
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
  MF_CHECK(shape.balance_groups == 0 ||
               (shape.balance_groups > 0 && shape.num_experts % shape.balance_groups == 0),
           "CUDA router: {} balance groups do not split {} experts", shape.balance_groups,
           shape.num_experts);
  MF_CHECK(shape.loss_tokens == 0 || shape.loss_tokens >= shape.num_tokens,
           "CUDA router: the losses average over {} tokens, fewer than the {} routed",
           shape.loss_tokens, shape.num_tokens);
}

// The tokens the losses average over (RouterShape::loss_tokens).
int64_t loss_tokens_of(const RouterShape& shape) {
  return shape.loss_tokens > 0 ? shape.loss_tokens : shape.num_tokens;
}

// The aux loss's G (ops::num_balance_groups).
int64_t groups_of(const RouterShape& shape) {
  return shape.balance_groups > 0 ? shape.balance_groups : shape.num_experts;
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
  return shape.num_experts + 1 + shape.num_tokens;
}

void router_losses(float* losses, int32_t* expert_counts, float* scratch, const float* probs,
                   const int32_t* expert_idx, const float* logits, const RouterShape& shape,
                   cudaStream_t stream) {
  // scratch: the sums [E + 1], then router_loss_sums' own scratch.
  float* sums = scratch;
  router_loss_sums(sums, expert_counts, scratch + shape.num_experts + 1, probs, expert_idx, logits,
                   shape, stream);
  router_losses_from_sums(losses, sums, expert_counts, shape, stream);
}

void router_loss_sums(float* sums, int32_t* expert_counts, float* scratch, const float* probs,
                      const int32_t* expert_idx, const float* logits, const RouterShape& shape,
                      cudaStream_t stream) {
  check_shape(shape);
  MF_CHECK(shape.num_tokens > 0, "router losses need at least one token");
  constexpr int kThreads = kWarpsPerBlock * kWarpSize;
  const int64_t n = shape.num_tokens, num_experts = shape.num_experts;
  const int64_t num_chunks = ceil_div(n, kTokensPerChunk);
  // prob sums [num_chunks, E], then z sums [num_chunks]; counts [num_chunks, E].
  DeviceBuffer<float> partial(static_cast<size_t>(num_chunks * (num_experts + 1)));
  DeviceBuffer<int32_t> counts(static_cast<size_t>(num_chunks * num_experts));
  float* z_sums = partial.data() + num_chunks * num_experts;
  float* z_terms = scratch;  // [n]
  z_term_kernel<<<token_blocks(n), kThreads, 0, stream>>>(z_terms, logits, n, num_experts);
  MF_CUDA_CHECK_LAUNCH();
  router_chunk_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
      partial.data(), counts.data(), z_sums, probs, expert_idx, z_terms, n, num_experts,
      shape.top_k);
  MF_CUDA_CHECK_LAUNCH();
  router_totals_kernel<<<1, kThreads, 0, stream>>>(sums, expert_counts, partial.data(),
                                                   counts.data(), z_sums, num_chunks, num_experts);
  MF_CUDA_CHECK_LAUNCH();
}

void router_losses_from_sums(float* losses, const float* sums, const int32_t* expert_counts,
                             const RouterShape& shape, cudaStream_t stream) {
  check_shape(shape);
  MF_CHECK(loss_tokens_of(shape) > 0, "router losses need at least one token");
  router_losses_kernel<<<1, 1, 0, stream>>>(losses, sums, expert_counts, loss_tokens_of(shape),
                                            shape.num_experts, shape.top_k, groups_of(shape));
  MF_CUDA_CHECK_LAUNCH();
}

void router_backward(bf16* dlogits, const float* dgates, const float* logits, const float* probs,
                     const int32_t* expert_idx, const int32_t* expert_counts, float d_aux,
                     float d_z, const RouterShape& shape, cudaStream_t stream) {
  check_shape(shape);
  if (shape.num_tokens == 0) return;
  router_backward_kernel<<<token_blocks(shape.num_tokens), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      dlogits, dgates, logits, probs, expert_idx, expert_counts, d_aux, d_z, shape.num_tokens,
      loss_tokens_of(shape), shape.num_experts, shape.top_k, groups_of(shape),
      shape.norm_topk_prob);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
