// Fused AdamW on the GPU over one contiguous range of the flat fp32 parameter buffer, with the
// same arithmetic as train/adamw.cpp (decoupled decay, bias correction), the gradient scaled by
// the clipping factor on the fly, and the bf16 weight copy written in the same pass.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16.h"

namespace moeforge::cuda {

// The constants of one update. adamw_update reads them from device memory, so that a captured
// CUDA graph replays with each step's learning rate, bias corrections and clipping.
struct AdamWStep {
  float beta1, beta2, eps;
  float step_size;        // lr / (1 - beta1^t)
  float bc2_sqrt;         // sqrt(1 - beta2^t)
  float decay_factor;     // 1 - lr * weight_decay, for tensors with decay
  float no_decay_factor;  // for tensors without
  float grad_scale;       // clipping factor (1 when not clipped)
  int32_t skip;           // nonzero: the update changes nothing (a non-finite gradient norm)
};

// params, exp_avg, exp_avg_sq updated in place over [count] with the constants at step (device
// memory) and its decay_factor (decay) or no_decay_factor; params_bf16 (may be null) receives the
// rounded new parameters.
void adamw_update(float* params, bf16* params_bf16, float* exp_avg, float* exp_avg_sq,
                  const float* grads, int64_t count, const AdamWStep* step, bool decay,
                  cudaStream_t stream);

// One thread on the device, after the squares of the gradient's pieces are in slots [num_slots]:
// *norm = sqrt(the sum of the slots whose expert_slot is 0 + the sum of the others), each in slot
// order (train/adamw.h's model_grad_norm without an expert group, bit for bit); step->grad_scale =
// max_norm / (norm + 1e-6) when max_norm > 0 and norm > max_norm, else 1; step->skip = whether
// the norm is not finite (gpu_adamw.h's clipping_for).
void finish_grad_clipping(double* norm, AdamWStep* step, const double* slots,
                          const uint8_t* expert_slot, int64_t num_slots, double max_norm,
                          cudaStream_t stream);

}  // namespace moeforge::cuda
