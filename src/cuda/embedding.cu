// Embedding kernels: a row copy forward; the backward sums each token's rows in position order,
// one block per distinct token (no atomics).
#include "cuda/cuda_check.h"
#include "cuda/embedding.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* table,
                                         int64_t hidden) {
  const int64_t row = blockIdx.x;
  const float* src = table + static_cast<int64_t>(tokens[row]) * hidden;
  float* dst = out + row * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) dst[j] = src[j];
}

__global__ void embedding_backward_kernel(float* dtable, const float* dout,
                                          const int32_t* token_ids, const int32_t* offsets,
                                          const int32_t* positions, int64_t hidden) {
  const int64_t group = blockIdx.x;
  // An empty group (padding) must not touch its token's row: another block owns that row.
  if (offsets[group] == offsets[group + 1]) return;
  float* dst = dtable + static_cast<int64_t>(token_ids[group]) * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    float sum = 0.0f;
    for (int32_t p = offsets[group]; p < offsets[group + 1]; ++p) {
      sum += dout[static_cast<int64_t>(positions[p]) * hidden + j];
    }
    dst[j] += sum;
  }
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t n,
                       int64_t hidden, cudaStream_t stream) {
  if (n == 0) return;
  embedding_forward_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(out, tokens, table,
                                                                              hidden);
  MF_CUDA_CHECK_LAUNCH();
}

TokenGroups group_tokens(const int32_t* tokens, int64_t n) {
  int32_t max_token = -1;
  for (int64_t i = 0; i < n; ++i) max_token = tokens[i] > max_token ? tokens[i] : max_token;
  std::vector<int32_t> counts(static_cast<size_t>(max_token + 1), 0);
  for (int64_t i = 0; i < n; ++i) ++counts[static_cast<size_t>(tokens[i])];
  TokenGroups groups;
  std::vector<int32_t> start(counts.size(), 0);
  groups.offsets.push_back(0);
  for (size_t t = 0; t < counts.size(); ++t) {
    if (counts[t] == 0) continue;
    start[t] = groups.offsets.back();
    groups.token_ids.push_back(static_cast<int32_t>(t));
    groups.offsets.push_back(groups.offsets.back() + counts[t]);
  }
  groups.positions.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    groups.positions[static_cast<size_t>(start[static_cast<size_t>(tokens[i])]++)] =
        static_cast<int32_t>(i);
  }
  return groups;
}

void pad_token_groups(TokenGroups& groups, size_t num_groups) {
  MF_CHECK(num_groups >= groups.token_ids.size(), "cannot pad {} token groups to {}",
           groups.token_ids.size(), num_groups);
  groups.token_ids.resize(num_groups, 0);
  groups.offsets.resize(num_groups + 1, groups.offsets.back());
}

void embedding_backward(float* dtable, const float* dout, const int32_t* token_ids,
                        const int32_t* offsets, const int32_t* positions, int64_t num_groups,
                        int64_t hidden, cudaStream_t stream) {
  if (num_groups == 0) return;
  embedding_backward_kernel<<<static_cast<unsigned>(num_groups), kThreads, 0, stream>>>(
      dtable, dout, token_ids, offsets, positions, hidden);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
