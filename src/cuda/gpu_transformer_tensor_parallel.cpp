// GpuTransformer's tensor-parallel layer parts (parallel.layout "tp", the Megatron-LM baseline of
// MegaScale-MoE's ablation; model/tensor_parallel.h is the spec): the group setup, the exchanges
// along the sequence and of the FFNs' tokens, this rank's column slices of the weights (packed
// where a GEMM cannot read them in place) and the attention, dense-FFN and MoE layers between
// their all-gathers and reduce-scatters. Everything runs on stream_, in order: the ablation's
// "TP+TP, no overlap". Collectives go through the group's Communicator as exposed exchanges
// (<phase>_exchange under the phase timer).
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/gpu_transformer.h"
#include "cuda/gpu_transformer_buffers.h"
#include "cuda/reductions.h"
#include "cuda/shared_expert_gate.h"
#include "cuda/tensor_parallel.h"

namespace moeforge::cuda {
namespace {

// Where one rank's slice expert [begin, begin + width) of every expert's intermediate dimension
// sits (model/transformer.cpp's MoeSlices): gate and up [E, f, h] viewed as [E, f * h] (its rows
// of each expert), down [E, h, f] viewed as [E * h, f] (its columns).
struct ExpertSlices {
  ColumnSlice gate_up, down;
};

ExpertSlices expert_slices(const ModelConfig& c, const ColumnSlice& expert) {
  const int64_t h = c.hidden_size;
  return {{c.num_experts, expert.cols * h, expert.begin * h, expert.width * h},
          {c.num_experts * h, expert.cols, expert.begin, expert.width}};
}

}  // namespace

void GpuTransformer::set_tensor_parallel_group(Communicator& group) {
  MF_CHECK(n_ == 0, "set_tensor_parallel_group must come before the first forward");
  MF_CHECK(ep_ == nullptr,
           "a model is sequence/expert-parallel or tensor-parallel, not both "
           "(set_expert_parallel_group came first)");
  MF_CHECK(!graphs_enabled_, "CUDA graphs run one GPU's step only (set_cuda_graphs)");
  const int64_t size = group.size();
  MF_CHECK(config_.num_heads % size == 0 && config_.num_kv_heads % size == 0,
           "tensor parallelism over {} GPUs needs the attention heads ({}) and KV heads ({}) "
           "divisible by {}",
           size, config_.num_heads, config_.num_kv_heads, size);
  bool dense_layers = false;
  for (int64_t l = 0; l < config_.num_layers; ++l) dense_layers |= !config_.layer_is_moe(l);
  MF_CHECK(!dense_layers || config_.intermediate_size % size == 0,
           "tensor parallelism over {} GPUs needs intermediate_size ({}) divisible by {}", size,
           config_.intermediate_size, size);
  MF_CHECK(!config_.is_moe() || (config_.moe_intermediate_size % size == 0 &&
                                 config_.shared_expert_intermediate_size % size == 0),
           "tensor parallelism over {} GPUs needs moe_intermediate_size ({}) and "
           "shared_expert_intermediate_size ({}) divisible by {}",
           size, config_.moe_intermediate_size, config_.shared_expert_intermediate_size, size);
  const ExpertShard& held = layout_.expert_shard();
  MF_CHECK(!layout_.experts_sharded(),
           "tensor parallelism runs every expert on every GPU (on its columns): the model must "
           "hold all experts, not shard {} of {}",
           held.rank, held.size);
  if (size == 1) return;
  tp_ = &group;
  // The expert GEMMs run on this rank's columns: grouped where that width allows it.
  grouped_experts_ =
      config_.is_moe() && grouped_.available({config_.num_experts, config_.hidden_size,
                                              config_.moe_intermediate_size / size});
  accumulated_ranges_.clear();
  find_accumulated_ranges();
}

ColumnSlice GpuTransformer::ffn_slice(int64_t ffn) const {
  const int64_t width = ffn / tensor_parallel_size();
  return ColumnSlice{config_.hidden_size, ffn, (tp_ != nullptr ? tp_->rank() : 0) * width, width};
}

int64_t GpuTransformer::shared_down_slice_at() const {
  return 3 * config_.num_experts * ffn_slice(config_.moe_intermediate_size).width *
         config_.hidden_size;
}

void GpuTransformer::pack_ffn_slices(int64_t l) {
  const LayerOffsets& o = layout_.layer(l);
  bf16* packed = scratch_->tp_weights.data();
  if (!config_.layer_is_moe(l)) {
    pack_columns(packed, wb(o.mlp_down), ffn_slice(config_.intermediate_size), stream_);
    return;
  }
  // Gate, up and down one after another, where expert_weights reads them.
  const ColumnSlice expert = ffn_slice(config_.moe_intermediate_size);
  const int64_t block = config_.num_experts * expert.width * config_.hidden_size;
  const ExpertSlices slices = expert_slices(config_, expert);
  pack_columns(packed, wb(o.experts_gate), slices.gate_up, stream_);
  pack_columns(packed + block, wb(o.experts_up), slices.gate_up, stream_);
  pack_columns(packed + 2 * block, wb(o.experts_down), slices.down, stream_);
  if (o.shared_down >= 0) {
    pack_columns(packed + shared_down_slice_at(), wb(o.shared_down),
                 ffn_slice(config_.shared_expert_intermediate_size), stream_);
  }
}

void GpuTransformer::add_ffn_slice_grads(int64_t l) {
  const LayerOffsets& o = layout_.layer(l);
  float* packed = scratch_->tp_grads.data();
  if (!config_.layer_is_moe(l)) {
    add_packed_columns(g(o.mlp_down), packed, ffn_slice(config_.intermediate_size), stream_);
    return;
  }
  const ExpertWeights ew = expert_weights(l);
  const ExpertSlices slices = expert_slices(config_, ffn_slice(config_.moe_intermediate_size));
  add_packed_columns(g(o.experts_gate), ew.dgate, slices.gate_up, stream_);
  add_packed_columns(g(o.experts_up), ew.dup, slices.gate_up, stream_);
  add_packed_columns(g(o.experts_down), ew.ddown, slices.down, stream_);
  if (o.shared_down >= 0) {
    add_packed_columns(g(o.shared_down), packed + shared_down_slice_at(),
                       ffn_slice(config_.shared_expert_intermediate_size), stream_);
  }
}

void GpuTransformer::tp_all_gather_sequences(bf16* full, const bf16* local, int64_t batch,
                                             int64_t seq) {
  const int64_t h = config_.hidden_size;
  const auto count = static_cast<size_t>(batch * seq * h);
  // One sequence: the rank order is the sequence order.
  bf16* gathered = batch == 1 ? full : scratch_->tp_stage_bf16.data();
  exposed_exchange([&] { tp_->all_gather(local, gathered, count, CommDType::kBFloat16); });
  if (batch > 1) {
    rank_order_to_sequences(full, gathered, batch, seq, h, tp_->size(), sizeof(bf16), stream_);
  }
}

void GpuTransformer::tp_reduce_scatter_sequences(float* local, const float* full, int64_t batch,
                                                 int64_t seq) {
  const int64_t h = config_.hidden_size;
  const float* send = full;
  if (batch > 1) {
    float* staged = scratch_->tp_stage_f32.data();
    sequences_to_rank_order(staged, full, batch, seq, h, tp_->size(), sizeof(float), stream_);
    send = staged;
  }
  exposed_exchange([&] {
    tp_->reduce_scatter_sum(send, local, static_cast<size_t>(batch * seq * h), CommDType::kFloat32);
  });
}

void GpuTransformer::tp_gather_ffn_input(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  exposed_exchange([&] {
    tp_->all_gather(a.ln2_ptr, a.ln2_group.data(), static_cast<size_t>(n_ * config_.hidden_size),
                    CommDType::kBFloat16);
  });
  pack_ffn_slices(l);
}

void GpuTransformer::tp_reduce_scatter_ffn_output(const float* partial, float* out) {
  exposed_exchange([&] {
    tp_->reduce_scatter_sum(partial, out, static_cast<size_t>(n_ * config_.hidden_size),
                            CommDType::kFloat32);
  });
}

void GpuTransformer::tp_attention_forward(int64_t l, int64_t batch, int64_t seq) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, d = config_.head_dim;
  tp_all_gather_sequences(a.ln1_group.data(), a.ln1_ptr, batch, seq);
  // Column-parallel q/k/v of this rank's heads, RoPE at the full sequences' positions, attention.
  const AttentionShard shard = attention_shard(l);
  attention_projections_unpacked(l, shard);
  attention_.forward(
      a.att.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(),
      AttentionShape{batch, seq * tp_->size(), shard.num_heads, shard.num_kv_heads, d}, stream_);
  // Row-parallel o_proj: this rank's heads' columns of W_o give partial sums over the full
  // sequences, summed onto this rank's positions, then the residual.
  const ColumnSlice o_cols{h, config_.q_dim(), shard.q_begin, shard.num_heads * d};
  pack_columns(s.tp_weights.data(), wb(o.o_proj), o_cols, stream_);
  blas_.linear_forward(s.group_f32.data(), OutType::kFloat, a.att.data(), s.tp_weights.data(),
                       nullptr, shard.rows, o_cols.width, h, false, stream_);
  tp_reduce_scatter_sequences(a.x_mid.data(), s.group_f32.data(), batch, seq);
  add_inplace(a.x_mid.data(), a.x_in.data(), n_ * h, stream_);
}

void GpuTransformer::tp_attention_backward(int64_t l, int64_t batch, int64_t seq) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, d = config_.head_dim;
  const AttentionShard shard = attention_shard(l);
  // The output gradient of the full sequences [batch, ranks * seq, h] through this rank's columns
  // of W_o: d(att) and W_o's gradient (packed, then added into the flat gradient).
  bf16* dout = s.group_bf16.data();
  tp_all_gather_sequences(dout, s.dres_bf16.data(), batch, seq);
  const ColumnSlice o_cols{h, config_.q_dim(), shard.q_begin, shard.num_heads * d};
  pack_columns(s.tp_weights.data(), wb(o.o_proj), o_cols, stream_);
  blas_.linear_backward_input(s.datt.data(), OutType::kBf16, dout, s.tp_weights.data(), shard.rows,
                              o_cols.width, h, false, stream_);
  blas_.linear_backward_weight(s.tp_grads.data(), dout, a.att.data(), shard.rows, o_cols.width, h,
                               false, stream_);
  add_packed_columns(g(o.o_proj), s.tp_grads.data(), o_cols, stream_);
  attention_.backward(
      s.dq.data(), s.dk.data(), s.dv.data(), s.datt.data(), a.q.data(), a.k.data(), a.v.data(),
      a.att.data(), a.lse.data(),
      AttentionShape{batch, seq * tp_->size(), shard.num_heads, shard.num_kv_heads, d}, stream_);
  // The projections' input gradient of the full sequences, summed onto this rank's positions.
  attention_projections_backward_unpacked(l, shard, s.group_f32.data());
  tp_reduce_scatter_sequences(s.dln.data(), s.group_f32.data(), batch, seq);
}

void GpuTransformer::tp_dense_ffn_backward(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const auto count = static_cast<size_t>(n_ * config_.hidden_size);
  // The group's output gradient (its GEMMs read bf16), the slice's backward into the group's
  // input gradient, summed onto this rank's tokens.
  exposed_exchange([&] {
    tp_->all_gather(s.dres_bf16.data(), s.group_bf16.data(), count, CommDType::kBFloat16);
  });
  pack_ffn_slices(l);
  swiglu_ffn_backward(s.group_bf16.data(), a.ln2_group.data(), a.h_act_ptr, a.h_gate.data(),
                      a.h_up.data(), swiglu_weights(l, false), ffn_rows(), s.tp_stage_f32.data(),
                      false);
  add_ffn_slice_grads(l);
  exposed_exchange([&] {
    tp_->reduce_scatter_sum(s.tp_stage_f32.data(), s.dln.data(), count, CommDType::kFloat32);
  });
}

void GpuTransformer::moe_tp_forward(int64_t l, float* x_out) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  tp_gather_ffn_input(l);
  // The router on the group's tokens (the same on every rank), the row map over every expert, the
  // experts on this rank's columns and their gate-weighted partial sums into group_f32; the shared
  // expert's slice, gated, joins them.
  moe_chunk_forward(l, 0, a.ln2_group.data(), s.group_f32.data(), nullptr, stream_);
  if (config_.shared_expert_intermediate_size > 0) {
    shared_expert_forward(l);
    shared_expert_gate_forward(s.group_f32.data(), a.shared_score.data(), a.ln2_group.data(),
                               wb(o.shared_expert_gate), a.shared_out.data(), ffn_rows(),
                               config_.hidden_size, stream_);
  }
  tp_reduce_scatter_ffn_output(s.group_f32.data(), x_out);
  // The per-expert GEMMs copied the offsets already.
  if (grouped_experts_) {
    MF_CUDA_CHECK(cudaMemcpyAsync(a.host_offsets.data(), a.expert_offsets.data(),
                                  static_cast<size_t>(config_.num_experts + 1) * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream_));
  }
}

void GpuTransformer::moe_tp_backward(int64_t l) {
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size;
  exposed_exchange([&] {
    tp_->all_gather(s.dres.data(), s.group_f32.data(), static_cast<size_t>(n_ * h),
                    CommDType::kFloat32);
  });
  pack_ffn_slices(l);
  // The routed experts' input gradient of the group's tokens into tp_stage_f32 (group_f32 keeps
  // the output gradient, which the shared expert reads), the gate gradients' partial sums into
  // dgates, then the experts' weight gradients into their packed slices (the per-expert GEMMs add
  // to them: zeros first).
  moe_chunk_backward_input(l, 0, s.group_f32.data(), s.tp_stage_f32.data(), stream_);
  if (!grouped_experts_) {
    zero_device(s.tp_grads.data(), static_cast<size_t>(shared_down_slice_at()) * sizeof(float),
                stream_);
  }
  moe_chunk_backward_weight(l, 0, layers_[static_cast<size_t>(l)].ln2_group.data(), stream_);
  if (config_.shared_expert_intermediate_size > 0) shared_expert_backward(l);
  add_ffn_slice_grads(l);
  // The input gradient onto this rank's tokens; the gate gradients summed (moe_backward's router
  // backward reads them).
  exposed_exchange([&] {
    tp_->reduce_scatter_sum(s.tp_stage_f32.data(), s.dln.data(), static_cast<size_t>(n_ * h),
                            CommDType::kFloat32);
    tp_->all_reduce_sum(s.dgates.data(),
                        static_cast<size_t>(moe_tokens() * config_.num_experts_per_tok),
                        CommDType::kFloat32);
  });
}

}  // namespace moeforge::cuda
