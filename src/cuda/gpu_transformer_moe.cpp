// GpuTransformer's routed MoE layers: the experts on rows in expert order (grouped GEMMs and
// SwiGLU, forward and backward), shared by both dispatches and tensor parallelism (on this rank's
// packed columns, expert_weights); the experts' part of a chunk of tokens (router, row map, the
// experts, combine; its backward in an input-gradient and a weight-gradient pass), shared by one
// GPU (one chunk of the rank's tokens), the all-gather dispatch (chunks of the group's tokens,
// gpu_transformer_expert_parallel.cpp) and tensor parallelism (one chunk of the group's tokens,
// gpu_transformer_tensor_parallel.cpp); and the layer's forward, combine and backward around them
// (the all-to-all dispatch: gpu_transformer_a2a.cpp).
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/gpu_transformer.h"
#include "cuda/gpu_transformer_buffers.h"
#include "cuda/moe_dispatch.h"
#include "cuda/reductions.h"
#include "cuda/router.h"
#include "cuda/shared_expert_gate.h"
#include "cuda/swiglu.h"
#include "ops/row_map.h"

namespace moeforge::cuda {

void GpuTransformer::moe_forward(int64_t l, float* x_out, float* losses) {
  if (a2a_layer(l)) {
    moe_a2a_forward(l, x_out, losses);
    return;
  }
  Layer& a = layers_[static_cast<size_t>(l)];
  if (tp_ != nullptr) {
    moe_tp_forward(l, x_out);
  } else if (ep_ != nullptr) {
    moe_group_forward(l, x_out);
  } else {
    moe_chunk_forward(l, 0, a.ln2_ptr, x_out, a.x_mid.data(), stream_);
    // The per-expert GEMMs copied the offsets already.
    if (grouped_experts_) {
      MF_CUDA_CHECK(cudaMemcpyAsync(a.host_offsets.data(), a.expert_offsets.data(),
                                    static_cast<size_t>(config_.num_experts + 1) * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, stream_));
    }
  }
  router_losses(losses, a.expert_counts.data(), scratch_->router_scratch.data(), a.probs.data(),
                a.expert_idx.data(), a.router_logits.data(),
                RouterShape{moe_tokens(), config_.num_experts, config_.num_experts_per_tok,
                            config_.norm_topk_prob, config_.router_balance_groups},
                stream_);
  MF_CUDA_CHECK(cudaMemcpyAsync(a.host_counts.data(), a.expert_counts.data(),
                                a.expert_counts.bytes(), cudaMemcpyDeviceToHost, stream_));
}

void GpuTransformer::moe_chunk_forward(int64_t l, int64_t chunk, const bf16* x_tokens, float* out,
                                       const float* residual, cudaStream_t stream) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t h = config_.hidden_size;
  const int64_t num_experts = config_.num_experts, k = config_.num_experts_per_tok;
  // The chunk's tokens [first, first + tokens) and their rows [first * k, ...).
  const int64_t tokens = chunk_tokens(), first = chunk * tokens;
  const bf16* x = x_tokens + first * h;
  float* logits = a.router_logits.data() + first * num_experts;
  int32_t* expert_idx = a.expert_idx.data() + first * k;
  float* gates = a.gates.data() + first * k;
  int32_t* assignment_row = a.assignment_row.data() + first * k;
  int32_t* row_token = a.row_token.data() + first * k;
  blas_.linear_forward(logits, OutType::kFloat, x, wb(o.router), nullptr, tokens, h, num_experts,
                       false, stream);
  router_forward(a.probs.data() + first * num_experts, expert_idx, gates, logits,
                 RouterShape{tokens, num_experts, k, config_.norm_topk_prob}, stream);
  // Several chunks only without a capacity (set_expert_parallel_group): one chunk has all the
  // tokens the experts see and the capacity of the CPU reference. The rows past the kept ones are
  // unused.
  const int64_t capacity = ops::expert_capacity(config_.capacity_factor, tokens, k, num_experts);
  // The chunk's expert offsets [num_local + 1] over this rank's experts (and their host copy).
  const int64_t at = chunk * (num_local_experts() + 1);
  int32_t* offsets = a.expert_offsets.data() + at;
  int32_t* host_offsets = a.host_offsets.data() + at;
  if (ep_ == nullptr) {
    // One GPU, or tensor parallelism: every expert (on this rank's columns).
    build_row_map(offsets, assignment_row, row_token, scratch_->row_map.data(), expert_idx, tokens,
                  k, num_experts, capacity, stream);
  } else {
    build_local_row_map(offsets, assignment_row, row_token, a.local_idx.data() + first * k,
                        scratch_->row_map.data(), expert_idx, tokens, k,
                        expert_parallel_rank() * num_local_experts(), num_local_experts(), capacity,
                        stream);
  }
  // The rows of this rank's experts, [0, offsets[num_local]) of the chunk's tokens * k (about
  // 1 / ep of them under expert parallelism, fewer under a capacity): the row-wise ops below touch
  // only those, the GEMMs only the experts' ranges.
  const int32_t* used_rows = offsets + num_local_experts();
  bf16* rows = scratch_->rows.data() + first * k * h;
  scatter_rows(rows, x, row_token, used_rows, tokens * k, h, stream);
  if (!grouped_experts_) {
    // Per-expert cuBLASLt calls need the row ranges on the host: one synchronisation per chunk.
    MF_CUDA_CHECK(cudaMemcpyAsync(host_offsets, offsets,
                                  static_cast<size_t>(num_local_experts() + 1) * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  bf16* y_rows = a.y_rows.data() + first * k * h;
  experts_forward(l, rows, y_rows, first * k, tokens * k, ExpertRows{offsets, host_offsets},
                  stream);
  combine_rows(out + first * h, residual == nullptr ? nullptr : residual + first * h, y_rows, gates,
               assignment_row, tokens, k, h, stream);
}

GpuTransformer::ExpertWeights GpuTransformer::expert_weights(int64_t l) {
  const LayerOffsets& o = layout_.layer(l);
  if (tp_ == nullptr) {
    return {wb(o.experts_gate),
            wb(o.experts_up),
            wb(o.experts_down),
            g(o.experts_gate),
            g(o.experts_up),
            g(o.experts_down),
            config_.moe_intermediate_size,
            false};
  }
  // This rank's columns of every expert, packed by pack_ffn_slices: gate, up, down.
  const int64_t f = ffn_slice(config_.moe_intermediate_size).width;
  const int64_t block = config_.num_experts * f * config_.hidden_size;
  bf16* w = scratch_->tp_weights.data();
  float* dw = scratch_->tp_grads.data();
  return {w, w + block, w + 2 * block, dw, dw + block, dw + 2 * block, f, true};
}

void GpuTransformer::experts_forward(int64_t l, const bf16* x_rows, bf16* y_rows, int64_t first_row,
                                     int64_t num_rows, const ExpertRows& ranges,
                                     cudaStream_t stream) {
  Layer& a = layers_[static_cast<size_t>(l)];
  const ExpertWeights ew = expert_weights(l);
  const int64_t h = config_.hidden_size, f = ew.ffn;
  const int32_t* used_rows = ranges.device + num_local_experts();
  bf16* h_gate = a.h_gate.data() + first_row * f;
  bf16* h_up = a.h_up.data() + first_row * f;
  bf16* h_act = a.h_act_ptr + first_row * f;
  expert_forward(h_gate, x_rows, ew.gate, h, f, ranges, stream);
  expert_forward(h_up, x_rows, ew.up, h, f, ranges, stream);
  swiglu_forward(h_act, h_gate, h_up, used_rows, num_rows, f, stream);
  expert_forward(y_rows, h_act, ew.down, f, h, ranges, stream);
}

void GpuTransformer::moe_combine(int64_t l, float* x_out) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t n = n_, h = config_.hidden_size;
  // One GPU and the all-to-all dispatch: moe_forward's combine added the residual; the all-gather
  // dispatch and tensor parallelism: the exchanges summed the experts' outputs over the group into
  // x_out (the shared expert's too under tensor parallelism, whose slices ran on the group's
  // tokens).
  if ((ep_ != nullptr && !a2a_layer(l)) || tp_ != nullptr) {
    add_inplace(x_out, a.x_mid.data(), n * h, stream_);
  }
  if (config_.shared_expert_intermediate_size > 0 && tp_ == nullptr) {
    shared_expert_forward(l);
    shared_expert_gate_forward(x_out, a.shared_score.data(), a.ln2_ptr, wb(o.shared_expert_gate),
                               a.shared_out.data(), n, h, stream_);
  }
}

void GpuTransformer::moe_backward(int64_t l, float d_aux, float d_z) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t n = n_, h = config_.hidden_size;
  const int64_t num_experts = config_.num_experts, k = config_.num_experts_per_tok;
  if (a2a_layer(l)) {
    // The routed experts' input gradient into dln, this rank's tokens' gate gradients into dgates.
    moe_a2a_backward(l);
  } else if (tp_ != nullptr) {
    // The routed and the shared experts' input gradient into dln, the group's gate gradients
    // summed into dgates.
    moe_tp_backward(l);
  } else if (ep_ != nullptr) {
    // The routed experts' input gradient into dln, the group's gate gradients into dgates.
    moe_group_backward(l);
  } else {
    moe_chunk_backward_input(l, 0, s.dres.data(), s.dln.data(), stream_);
    moe_chunk_backward_weight(l, 0, a.ln2_ptr, stream_);
  }
  if (config_.shared_expert_intermediate_size > 0 && tp_ == nullptr) shared_expert_backward(l);
  // The router's backward over the routed tokens: under the all-gather dispatch and tensor
  // parallelism the group's (the same on every rank), of which each rank keeps its own tokens'
  // rows for its input and weight gradients, so the group's sum counts each once; those rows are
  // one piece per chunk of the group's order (moe_group_forward). Under the all-to-all dispatch
  // this rank's, with the group's counts (the plan's) and the losses' mean over the group's tokens.
  const bool a2a = a2a_layer(l);
  router_backward(s.drouter.data(), s.dgates.data(), a.router_logits.data(), a.probs.data(),
                  a.expert_idx.data(), a2a ? a.a2a_maps.group_load : a.expert_counts.data(), d_aux,
                  d_z,
                  RouterShape{routed_tokens(l), num_experts, k, config_.norm_topk_prob,
                              config_.router_balance_groups, moe_tokens()},
                  stream_);
  const int64_t m = n / ep_chunks_;
  for (int64_t c = 0; c < ep_chunks_; ++c) {
    const int64_t piece = a2a ? c : c * group_size() + group_rank();
    const bf16* drouter = s.drouter.data() + piece * m * num_experts;
    blas_.linear_backward_input(s.dln.data() + c * m * h, OutType::kFloat, drouter, wb(o.router), m,
                                h, num_experts, true, stream_);
    blas_.linear_backward_weight(g(o.router), drouter, a.ln2_ptr + c * m * h, m, h, num_experts,
                                 accumulate_grads_ || c > 0, stream_);
  }
}

void GpuTransformer::moe_chunk_backward_input(int64_t l, int64_t chunk, const float* dout,
                                              float* dx, cudaStream_t stream) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, k = config_.num_experts_per_tok;
  const int64_t tokens = chunk_tokens(), first = chunk * tokens;
  const ExpertRows ranges = chunk_expert_rows(l, chunk);
  const int32_t* assignment_row = a.assignment_row.data() + first * k;
  // drows: the gradient of the expert outputs (kept for the down projection's weight gradient);
  // rows: the gradient of the expert inputs (free until moe_chunk_backward_weight gathers the
  // inputs into it).
  bf16* drows = s.drows.data() + first * k * h;
  bf16* dx_rows = s.rows.data() + first * k * h;
  combine_rows_backward(drows, s.dgates.data() + first * k, dout + first * h,
                        a.y_rows.data() + first * k * h, a.gates.data() + first * k, assignment_row,
                        tokens, k, h, stream);
  experts_backward_input(l, dx_rows, drows, first * k, tokens * k, ranges, stream);
  // dx may be dout itself (expert parallelism: the chunk's gathered output gradient is consumed
  // by now, its rows take the group's input gradient).
  scatter_rows_backward(dx + first * h, dx_rows, assignment_row, tokens, k, h, stream);
}

void GpuTransformer::moe_chunk_backward_weight(int64_t l, int64_t chunk, const bf16* x_tokens,
                                               cudaStream_t stream) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, k = config_.num_experts_per_tok;
  const int64_t tokens = chunk_tokens(), first = chunk * tokens;
  const ExpertRows ranges = chunk_expert_rows(l, chunk);
  // The experts' inputs, gathered again from the tokens.
  bf16* rows = s.rows.data() + first * k * h;
  scatter_rows(rows, x_tokens + first * h, a.row_token.data() + first * k,
               ranges.device + num_local_experts(), tokens * k, h, stream);
  // Only the first chunk assigns the experts' gradients (a kAssign backward); the others add.
  // (Tensor parallelism's packed slices are assigned in every backward: experts_backward_weight.)
  experts_backward_weight(l, s.drows.data() + first * k * h, rows, first * k,
                          !accumulate_grads_ && chunk == 0, ranges, stream);
}

void GpuTransformer::experts_backward_input(int64_t l, bf16* dx_rows, const bf16* dy_rows,
                                            int64_t first_row, int64_t num_rows,
                                            const ExpertRows& ranges, cudaStream_t stream) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const ExpertWeights ew = expert_weights(l);
  const int64_t h = config_.hidden_size, f = ew.ffn;
  const int32_t* used_rows = ranges.device + num_local_experts();
  bf16* dh_gate = s.dh_gate.data() + first_row * f;
  bf16* dh_up = s.dh_up.data() + first_row * f;
  expert_backward_input(dh_gate, dy_rows, ew.down, f, h, false, ranges, stream);
  swiglu_backward(dh_gate, dh_up, dh_gate, a.h_gate.data() + first_row * f,
                  a.h_up.data() + first_row * f, used_rows, num_rows, f, stream);
  expert_backward_input(dx_rows, dh_gate, ew.gate, h, f, false, ranges, stream);
  expert_backward_input(dx_rows, dh_up, ew.up, h, f, true, ranges, stream);
}

void GpuTransformer::experts_backward_weight(int64_t l, const bf16* dy_rows, const bf16* x_rows,
                                             int64_t first_row, bool assign,
                                             const ExpertRows& ranges, cudaStream_t stream) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const ExpertWeights ew = expert_weights(l);
  const int64_t h = config_.hidden_size, f = ew.ffn;
  // Packed slices (tensor parallelism) are scratch: always assigned, then added to the flat
  // gradient (add_ffn_slice_grads).
  const bool assign_grads = assign || ew.packed;
  expert_backward_weight(ew.ddown, dy_rows, a.h_act_ptr + first_row * f, f, h, assign_grads, ranges,
                         stream);
  expert_backward_weight(ew.dgate, s.dh_gate.data() + first_row * f, x_rows, h, f, assign_grads,
                         ranges, stream);
  expert_backward_weight(ew.dup, s.dh_up.data() + first_row * f, x_rows, h, f, assign_grads, ranges,
                         stream);
}

}  // namespace moeforge::cuda
