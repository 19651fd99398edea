// One thread per (batch, KV head, dim) element of dv; dq and dk are zeroed.
#include "cuda/attention_single_key.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

__global__ void single_key_dv_kernel(bf16* dv, const bf16* dout, int64_t batch, int64_t num_q_heads,
                                     int64_t num_kv_heads, int64_t head_dim) {
  const int64_t total = batch * num_kv_heads * head_dim;
  const int64_t group = num_q_heads / num_kv_heads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % head_dim;
    const int64_t kv_head = (idx / head_dim) % num_kv_heads;
    const int64_t b = idx / (head_dim * num_kv_heads);
    float sum = 0.0f;
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      sum += __bfloat162float(dout[(b * num_q_heads + h) * head_dim + j]);
    }
    dv[idx] = __float2bfloat16_rn(sum);
  }
}

}  // namespace

void attention_backward_single_key(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, int64_t batch,
                                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                   cudaStream_t stream) {
  zero_device(dq, static_cast<size_t>(batch * num_q_heads * head_dim) * sizeof(bf16), stream);
  zero_device(dk, static_cast<size_t>(batch * num_kv_heads * head_dim) * sizeof(bf16), stream);
  const int64_t total = batch * num_kv_heads * head_dim;
  if (total == 0) return;
  constexpr int kThreads = 256;
  single_key_dv_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      dv, dout, batch, num_q_heads, num_kv_heads, head_dim);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
