// GpuTransformer's routed MoE layers: the experts' part of a chunk of tokens (router, row map,
// grouped GEMMs, combine; its backward in an input-gradient and a weight-gradient pass), shared by
// one GPU (one chunk of the rank's tokens) and expert parallelism (chunks of the group's tokens,
// gpu_transformer_expert_parallel.cpp), and the layer's forward, combine and backward around it.
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

void GpuTransformer::moe_forward(int64_t l, float* x_out) {
  if (ep_ != nullptr) {
    moe_group_forward(l, x_out);
    return;
  }
  Layer& a = layers_[static_cast<size_t>(l)];
  moe_chunk_forward(l, 0, a.ln2_ptr, x_out, a.x_mid.data(), stream_);
  // The per-expert GEMMs copied the offsets already.
  if (grouped_experts_) {
    MF_CUDA_CHECK(cudaMemcpyAsync(a.host_offsets.data(), a.expert_offsets.data(),
                                  static_cast<size_t>(config_.num_experts + 1) * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream_));
  }
}

void GpuTransformer::moe_chunk_forward(int64_t l, int64_t chunk, const bf16* x_tokens, float* out,
                                       const float* residual, cudaStream_t stream) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t h = config_.hidden_size, f = config_.moe_intermediate_size;
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
  const ExpertRows ranges{offsets, host_offsets};
  bf16* h_gate = a.h_gate.data() + first * k * f;
  bf16* h_up = a.h_up.data() + first * k * f;
  bf16* h_act = a.h_act_ptr + first * k * f;
  bf16* y_rows = a.y_rows.data() + first * k * h;
  expert_forward(h_gate, rows, wb(o.experts_gate), h, f, ranges, stream);
  expert_forward(h_up, rows, wb(o.experts_up), h, f, ranges, stream);
  swiglu_forward(h_act, h_gate, h_up, used_rows, tokens * k, f, stream);
  expert_forward(y_rows, h_act, wb(o.experts_down), f, h, ranges, stream);
  combine_rows(out + first * h, residual == nullptr ? nullptr : residual + first * h, y_rows, gates,
               assignment_row, tokens, k, h, stream);
}

void GpuTransformer::moe_combine(int64_t l, float* x_out) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t n = n_, h = config_.hidden_size;
  // One GPU: moe_forward's combine added the residual; expert parallelism: moe_group_forward
  // summed the experts' outputs over the group into x_out.
  if (ep_ != nullptr) add_inplace(x_out, a.x_mid.data(), n * h, stream_);
  if (config_.shared_expert_intermediate_size > 0) {
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
  if (ep_ != nullptr) {
    // The routed experts' input gradient into dln, the group's gate gradients into dgates.
    moe_group_backward(l);
  } else {
    moe_chunk_backward_input(l, 0, s.dres.data(), s.dln.data(), stream_);
    moe_chunk_backward_weight(l, 0, a.ln2_ptr, stream_);
  }
  if (config_.shared_expert_intermediate_size > 0) shared_expert_backward(l);
  // The router's backward over the routed tokens (the group's: the same on every rank); each rank
  // keeps its own tokens' rows for its input and weight gradients, so the group's sum counts each
  // once. Those rows are one piece per chunk of the group's order (moe_group_forward).
  const int64_t ng = moe_tokens();
  router_backward(
      s.drouter.data(), s.dgates.data(), a.router_logits.data(), a.probs.data(),
      a.expert_idx.data(), a.expert_counts.data(), d_aux, d_z,
      RouterShape{ng, num_experts, k, config_.norm_topk_prob, config_.router_balance_groups},
      stream_);
  const int64_t m = n / ep_chunks_;
  for (int64_t c = 0; c < ep_chunks_; ++c) {
    const bf16* drouter =
        s.drouter.data() + (c * expert_parallel_size() + expert_parallel_rank()) * m * num_experts;
    blas_.linear_backward_input(s.dln.data() + c * m * h, OutType::kFloat, drouter, wb(o.router), m,
                                h, num_experts, true, stream_);
    blas_.linear_backward_weight(g(o.router), drouter, a.ln2_ptr + c * m * h, m, h, num_experts,
                                 accumulate_grads_ || c > 0, stream_);
  }
}

void GpuTransformer::moe_chunk_backward_input(int64_t l, int64_t chunk, const float* dout,
                                              float* dx, cudaStream_t stream) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, f = config_.moe_intermediate_size;
  const int64_t k = config_.num_experts_per_tok;
  const int64_t tokens = chunk_tokens(), first = chunk * tokens;
  const ExpertRows ranges = chunk_expert_rows(l, chunk);
  const int32_t* used_rows = ranges.device + num_local_experts();
  const int32_t* assignment_row = a.assignment_row.data() + first * k;
  // drows: the gradient of the expert outputs (kept for the down projection's weight gradient);
  // rows: the gradient of the expert inputs (free until moe_chunk_backward_weight gathers the
  // inputs into it).
  bf16* drows = s.drows.data() + first * k * h;
  bf16* dx_rows = s.rows.data() + first * k * h;
  bf16* dh_gate = s.dh_gate.data() + first * k * f;
  bf16* dh_up = s.dh_up.data() + first * k * f;
  combine_rows_backward(drows, s.dgates.data() + first * k, dout + first * h,
                        a.y_rows.data() + first * k * h, a.gates.data() + first * k, assignment_row,
                        tokens, k, h, stream);
  expert_backward_input(dh_gate, drows, wb(o.experts_down), f, h, false, ranges, stream);
  swiglu_backward(dh_gate, dh_up, dh_gate, a.h_gate.data() + first * k * f,
                  a.h_up.data() + first * k * f, used_rows, tokens * k, f, stream);
  expert_backward_input(dx_rows, dh_gate, wb(o.experts_gate), h, f, false, ranges, stream);
  expert_backward_input(dx_rows, dh_up, wb(o.experts_up), h, f, true, ranges, stream);
  // dx may be dout itself (expert parallelism: the chunk's gathered output gradient is consumed
  // by now, its rows take the group's input gradient).
  scatter_rows_backward(dx + first * h, dx_rows, assignment_row, tokens, k, h, stream);
}

void GpuTransformer::moe_chunk_backward_weight(int64_t l, int64_t chunk, const bf16* x_tokens,
                                               cudaStream_t stream) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, f = config_.moe_intermediate_size;
  const int64_t k = config_.num_experts_per_tok;
  const int64_t tokens = chunk_tokens(), first = chunk * tokens;
  const ExpertRows ranges = chunk_expert_rows(l, chunk);
  // Only the first chunk assigns the experts' gradients (a kAssign backward); the others add.
  const bool assign = !accumulate_grads_ && chunk == 0;
  bf16* rows = s.rows.data() + first * k * h;
  expert_backward_weight(g(o.experts_down), s.drows.data() + first * k * h,
                         a.h_act_ptr + first * k * f, f, h, assign, ranges, stream);
  scatter_rows(rows, x_tokens + first * h, a.row_token.data() + first * k,
               ranges.device + num_local_experts(), tokens * k, h, stream);
  expert_backward_weight(g(o.experts_gate), s.dh_gate.data() + first * k * f, rows, h, f, assign,
                         ranges, stream);
  expert_backward_weight(g(o.experts_up), s.dh_up.data() + first * k * f, rows, h, f, assign,
                         ranges, stream);
}

}  // namespace moeforge::cuda
