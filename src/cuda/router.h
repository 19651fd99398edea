// MoE router on the GPU (ops/router.h is the spec): softmax, top-k with ties toward the lower
// expert index (selection on the logits, so it is exact), optional renormalisation, the aux and z
// losses, and the backward. One warp per token.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

struct RouterShape {
  int64_t num_tokens;
  int64_t num_experts;  // at most 256
  int64_t top_k;        // at most 8
  bool norm_topk_prob;
  int64_t balance_groups = 0;  // G of the aux loss (ops/router.h); 0: num_experts
  // The tokens the aux and z losses average over (0: num_tokens): the group's when each rank
  // routes its own tokens only (expert parallelism's all-to-all dispatch), so that the losses and
  // their gradients are the group's (model/moe_dispatch_a2a.h).
  int64_t loss_tokens = 0;
};

// logits [n, E] fp32 -> probs [n, E], expert_idx [n, k] (descending), gates [n, k].
void router_forward(float* probs, int32_t* expert_idx, float* gates, const float* logits,
                    const RouterShape& shape, cudaStream_t stream);

// losses[0] = aux loss, losses[1] = z loss of this router (definitions in ops/router.h), and
// expert_counts [E] = assignments per expert. scratch: at least router_loss_scratch_floats(shape).
// Fixed-order fp32 sums; the same as router_loss_sums then router_losses_from_sums.
int64_t router_loss_scratch_floats(const RouterShape& shape);
void router_losses(float* losses, int32_t* expert_counts, float* scratch, const float* probs,
                   const int32_t* expert_idx, const float* logits, const RouterShape& shape,
                   cudaStream_t stream);
// The two halves of router_losses, between which a group adds up its ranks' sums when each rank
// routes its own tokens (the all-to-all dispatch). router_loss_sums: sums [E + 1] = probs summed
// over the tokens per expert, then the tokens' z terms (squared log-sum-exp) summed, and
// expert_counts [E] = this router's assignments per expert. router_losses_from_sums: losses from
// such sums and counts over shape.loss_tokens tokens (the group's, or num_tokens).
void router_loss_sums(float* sums, int32_t* expert_counts, float* scratch, const float* probs,
                      const int32_t* expert_idx, const float* logits, const RouterShape& shape,
                      cudaStream_t stream);
void router_losses_from_sums(float* losses, const float* sums, const int32_t* expert_counts,
                             const RouterShape& shape, cudaStream_t stream);

// dlogits [n, E] (bf16, assigned) from dgates [n, k], d_aux and d_z (gradients of the final loss
// with respect to this router's aux and z losses); expert_counts from router_losses (the counts
// of the loss_tokens tokens the losses average over: the group's with loss_tokens set).
void router_backward(bf16* dlogits, const float* dgates, const float* logits, const float* probs,
                     const int32_t* expert_idx, const int32_t* expert_counts, float d_aux,
                     float d_z, const RouterShape& shape, cudaStream_t stream);

}  // namespace moeforge::cuda
