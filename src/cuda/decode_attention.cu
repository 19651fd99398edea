// The decode-attention kernels of decode_attention.h: a split-key pass with an online softmax per
// block, and the combine of the splits' partial results.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_attention.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTileKeys = kThreads;  // one key per thread for the scores
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kVec = 8;  // bf16 elements per 16-byte access
constexpr int kMaxHeadsPerBlock = 8;
constexpr int64_t kMaxSplits = 128;

struct DecodeParams {
  bf16* out;       // [num_queries, num_q_heads, head_dim] when num_splits == 1
  float* partial;  // [num_queries * num_q_heads, num_splits, head_dim + 2] otherwise
  const bf16* q;
  const bf16* k;
  const bf16* v;
  int64_t start, keys_per_split;
  int num_splits, num_q_heads, num_kv_heads, head_dim;
  int group;         // query heads per KV head
  int head_groups;   // blocks per KV head: ceil(group / kHeads)
  float scale_log2;  // 1 / sqrt(head_dim) * log2(e)
};

// Block (query * num_splits + split, kv_head * head_groups + head_group): up to kHeads query heads
// of one KV head over the keys [split * keys_per_split, ...) that the query sees.
template <int kMaxHeadDim, int kHeads>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams p) {
  constexpr int kVecs = kMaxHeadDim / kVec;  // 16-byte vectors per row
  constexpr int kKeyGroups = kThreads / kVecs;
  static_assert(kMaxHeadDim % kVec == 0 && kThreads % kVecs == 0, "row vectors tile the block");
  static_assert(kHeads >= 1 && kHeads <= kMaxHeadsPerBlock, "heads per block");
  __shared__ float q_s[kHeads][kMaxHeadDim];  // scaled by scale_log2; zero beyond head_dim
  __shared__ float p_s[kHeads][kTileKeys];    // a tile's scores, then its probabilities
  __shared__ float m_s[kHeads], l_s[kHeads], alpha_s[kHeads];
  __shared__ float red_s[kKeyGroups][kHeads][kMaxHeadDim];

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t query = blockIdx.x / p.num_splits;
  const int split = static_cast<int>(blockIdx.x % p.num_splits);
  const int kv_head = static_cast<int>(blockIdx.y) / p.head_groups;
  const int head_group = static_cast<int>(blockIdx.y) % p.head_groups;
  const int num_heads = min(kHeads, p.group - head_group * kHeads);
  const int d = p.head_dim;
  const int num_vecs = d / kVec;
  const int64_t q_row = query * p.num_q_heads + kv_head * p.group + head_group * kHeads;
  const int64_t kv_stride = static_cast<int64_t>(p.num_kv_heads) * d;
  const int64_t kv_offset = static_cast<int64_t>(kv_head) * d;
  const int64_t num_keys = p.start + query + 1;
  const int64_t key_begin = split * p.keys_per_split;
  const int64_t key_end = min(num_keys, key_begin + p.keys_per_split);

  for (int i = tid; i < kHeads * kMaxHeadDim; i += kThreads) {
    const int g = i / kMaxHeadDim, e = i % kMaxHeadDim;
    q_s[g][e] =
        g < num_heads && e < d ? __bfloat162float(p.q[(q_row + g) * d + e]) * p.scale_log2 : 0.0f;
  }
  if (tid < kHeads) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    alpha_s[tid] = 1.0f;
  }
  __syncthreads();

  const int vec = tid % kVecs, key_group = tid / kVecs;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  float acc[kHeads][kVec] = {};
  for (int64_t tile = key_begin; tile < key_end; tile += kTileKeys) {
    const int tile_len = static_cast<int>(min(static_cast<int64_t>(kTileKeys), key_end - tile));
    float s[kHeads] = {};
    if (tid < tile_len) {
      const bf16* key = p.k + (tile + tid) * kv_stride + kv_offset;
      for (int c = 0; c < num_vecs; ++c) {
        float kf[kVec];
        load_vec(kf, key + c * kVec);
#pragma unroll
        for (int g = 0; g < kHeads; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) s[g] = fmaf(q_s[g][c * kVec + e], kf[e], s[g]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kHeads; ++g) p_s[g][tid] = tid < tile_len ? s[g] : -INFINITY;
    __syncthreads();
    // Online softmax: warp w updates heads w, w + kWarps, ... (every tile has a key, so m_new is
    // finite and the masked entries become exactly 0).
    for (int g = warp; g < num_heads; g += kWarps) {
      const float m_old = m_s[g];
      float tile_max = -INFINITY;
      for (int j = lane; j < kTileKeys; j += kWarpSize) tile_max = fmaxf(tile_max, p_s[g][j]);
      const float m_new = fmaxf(m_old, warp_max(tile_max));
      float sum = 0.0f;
      for (int j = lane; j < kTileKeys; j += kWarpSize) {
        const float pj = exp2f(p_s[g][j] - m_new);
        p_s[g][j] = pj;
        sum += pj;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane's read of m_s[g] is ordered before lane 0 overwrites it
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        alpha_s[g] = alpha;
        m_s[g] = m_new;
        l_s[g] = l_s[g] * alpha + sum;
      }
    }
    __syncthreads();
    // P V: thread (key_group, vec) sums keys key_group, key_group + kKeyGroups, ... of the tile.
    if (vec < num_vecs) {
#pragma unroll
      for (int g = 0; g < kHeads; ++g) {
        const float alpha = alpha_s[g];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] *= alpha;
      }
      for (int j = key_group; j < tile_len; j += kKeyGroups) {
        float vf[kVec];
        load_vec(vf, p.v + (tile + j) * kv_stride + kv_offset + vec * kVec);
#pragma unroll
        for (int g = 0; g < kHeads; ++g) {
          const float pj = p_s[g][j];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(pj, vf[e], acc[g][e]);
        }
      }
    }
    __syncthreads();
  }

  if (vec < num_vecs) {
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) red_s[key_group][g][vec * kVec + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int i = tid; i < num_heads * d; i += kThreads) {
    const int g = i / d, e = i % d;
    float sum = 0.0f;
#pragma unroll
    for (int kg = 0; kg < kKeyGroups; ++kg) sum += red_s[kg][g][e];
    const int64_t row = q_row + g;
    if (p.num_splits == 1) {
      p.out[row * d + e] = __float2bfloat16_rn(sum / l_s[g]);  // split 0 holds key 0: l > 0
    } else {
      float* part = p.partial + (row * p.num_splits + split) * (d + 2);
      part[2 + e] = sum;
      if (e == 0) {
        part[0] = m_s[g];
        part[1] = l_s[g];
      }
    }
  }
}

// One block per (query, query head): out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, where
// m is the largest m_s (split 0 is never empty, so m is finite and empty splits weigh 0).
__global__ void decode_attention_combine_kernel(bf16* out, const float* partial, int num_splits,
                                                int head_dim) {
  const int64_t row = blockIdx.x;
  const int64_t width = head_dim + 2;
  const float* part = partial + row * num_splits * width;
  float m = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, part[s * width]);
  float l = 0.0f;
  for (int s = 0; s < num_splits; ++s) l += exp2f(part[s * width] - m) * part[s * width + 1];
  for (int e = static_cast<int>(threadIdx.x); e < head_dim; e += static_cast<int>(blockDim.x)) {
    float o = 0.0f;
    for (int s = 0; s < num_splits; ++s) o += exp2f(part[s * width] - m) * part[s * width + 2 + e];
    out[row * head_dim + e] = __float2bfloat16_rn(o / l);
  }
}

// The smallest of 1, 2, 4, 8 query heads per block that covers min(group, 8).
int heads_per_block(int64_t group) {
  int heads = 1;
  while (heads < group && heads < kMaxHeadsPerBlock) heads *= 2;
  return heads;
}

int num_sms() {
  int device = 0, sms = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <int kMaxHeadDim, int kHeads>
void launch(const DecodeParams& p, int64_t num_queries, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_queries * p.num_splits),
                  static_cast<unsigned>(p.num_kv_heads * p.head_groups));
  decode_attention_kernel<kMaxHeadDim, kHeads><<<grid, kThreads, 0, stream>>>(p);
  MF_CUDA_CHECK_LAUNCH();
}

template <int kMaxHeadDim>
void launch_heads(const DecodeParams& p, int heads, int64_t num_queries, cudaStream_t stream) {
  switch (heads) {
    case 1: launch<kMaxHeadDim, 1>(p, num_queries, stream); break;
    case 2: launch<kMaxHeadDim, 2>(p, num_queries, stream); break;
    case 4: launch<kMaxHeadDim, 4>(p, num_queries, stream); break;
    default: launch<kMaxHeadDim, 8>(p, num_queries, stream); break;
  }
}

void check_dims(const DecodeAttentionDims& dims) {
  MF_CHECK(dims.num_queries >= 1 && dims.start >= 0,
           "decode attention: needs at least one query after start >= 0, got {} queries after {}",
           dims.num_queries, dims.start);
  MF_CHECK(dims.num_kv_heads >= 1 && dims.num_q_heads % dims.num_kv_heads == 0,
           "decode attention: {} query heads are not a multiple of {} KV heads", dims.num_q_heads,
           dims.num_kv_heads);
  MF_CHECK(dims.head_dim >= kVec && dims.head_dim % kVec == 0 &&
               dims.head_dim <= kDecodeAttentionMaxHeadDim,
           "decode attention: head_dim must be a multiple of {} up to {}, got {}", kVec,
           kDecodeAttentionMaxHeadDim, dims.head_dim);
  MF_CHECK(dims.num_queries * dims.num_q_heads <= (int64_t{1} << 31) - 1,
           "decode attention: {} queries x {} heads exceed the launch grid", dims.num_queries,
           dims.num_q_heads);
}

// Key splits: about two waves of blocks over the GPU, whole tiles per split, at most kMaxSplits;
// the last split of the longest query is never empty.
struct SplitPlan {
  int64_t num_splits, keys_per_split;
};

SplitPlan plan_splits(const DecodeAttentionDims& dims) {
  check_dims(dims);
  const int64_t max_keys = dims.start + dims.num_queries;
  const int64_t group = dims.num_q_heads / dims.num_kv_heads;
  const int64_t blocks =
      dims.num_queries * dims.num_kv_heads * ceil_div(group, heads_per_block(group));
  const int64_t wanted = ceil_div(2 * static_cast<int64_t>(num_sms()), blocks);
  const int64_t splits =
      std::clamp<int64_t>(wanted, 1, std::min(kMaxSplits, ceil_div(max_keys, kTileKeys)));
  const int64_t keys_per_split = ceil_div(ceil_div(max_keys, splits), kTileKeys) * kTileKeys;
  return {ceil_div(max_keys, keys_per_split), keys_per_split};
}

}  // namespace

int64_t decode_attention_num_splits(const DecodeAttentionDims& dims) {
  return plan_splits(dims).num_splits;
}

void decode_attention_forward(bf16* out, const bf16* q, const bf16* k, const bf16* v,
                              const DecodeAttentionDims& dims, DeviceBuffer<float>& workspace,
                              cudaStream_t stream) {
  const auto [num_splits, keys_per_split] = plan_splits(dims);
  MF_CHECK(aligned_to(16, out, q, k, v),
           "decode attention: q, k, v and out must be 16-byte aligned");
  MF_CHECK(dims.num_queries * num_splits <= (int64_t{1} << 31) - 1,
           "decode attention: {} queries x {} key splits exceed the launch grid", dims.num_queries,
           num_splits);
  const int64_t group = dims.num_q_heads / dims.num_kv_heads;
  const int heads = heads_per_block(group);
  const int64_t rows = dims.num_queries * dims.num_q_heads;
  if (num_splits > 1) {
    const auto floats = static_cast<size_t>(rows * num_splits * (dims.head_dim + 2));
    if (workspace.size() < floats) workspace.resize(floats);
  }
  const DecodeParams p{
      out,
      num_splits > 1 ? workspace.data() : nullptr,
      q,
      k,
      v,
      dims.start,
      keys_per_split,
      static_cast<int>(num_splits),
      static_cast<int>(dims.num_q_heads),
      static_cast<int>(dims.num_kv_heads),
      static_cast<int>(dims.head_dim),
      static_cast<int>(group),
      static_cast<int>(ceil_div(group, heads)),
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(dims.head_dim)) * 1.4426950408889634)};
  if (dims.head_dim <= 64) {
    launch_heads<64>(p, heads, dims.num_queries, stream);
  } else if (dims.head_dim <= 128) {
    launch_heads<128>(p, heads, dims.num_queries, stream);
  } else {
    launch_heads<256>(p, heads, dims.num_queries, stream);
  }
  if (num_splits > 1) {
    decode_attention_combine_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        out, workspace.data(), static_cast<int>(num_splits), static_cast<int>(dims.head_dim));
    MF_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace moeforge::cuda
