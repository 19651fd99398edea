// Cross-entropy on the GPU (ops/cross_entropy.h is the spec), for one chunk of rows of logits at
// a time so that the LM head never materialises fp32 logits of the whole batch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// logits [rows, vocab] fp32; targets [rows] (-1: ignored). losses [rows] = logsumexp - logit of
// the target (0 when ignored). If dlogits is not null it is assigned
// (softmax - onehot(target)) * *dscale (0 rows when ignored), in bf16 for the head's GEMMs;
// dscale is one float in device memory (read by the kernels, so that a captured CUDA graph
// replays with the scale of each step).
void cross_entropy_forward_backward(float* losses, bf16* dlogits, const float* logits,
                                    const int32_t* targets, int64_t rows, int64_t vocab,
                                    const float* dscale, cudaStream_t stream);

}  // namespace moeforge::cuda
