// Forward and backward of the decoder on one GPU, composed from the kernels of src/cuda in the
// same order as model/transformer.cpp.
#include "cuda/gpu_transformer.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/error.h"
#include "cuda/adamw.h"
#include "cuda/cross_entropy.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/embedding.h"
#include "cuda/gpu_transformer_buffers.h"
#include "cuda/model_support.h"
#include "cuda/moe_dispatch.h"
#include "cuda/moe_dispatch_a2a.h"
#include "cuda/reductions.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"
#include "cuda/router.h"
#include "cuda/shared_expert_gate.h"
#include "cuda/stream_graph.h"
#include "cuda/swiglu.h"
#include "cuda/ulysses_exchange.h"

namespace moeforge::cuda {

namespace {

// Rows of the LM head per chunk: bounds the fp32 logits buffer to about 256 MiB.
int64_t head_chunk_rows(int64_t n, int64_t vocab) {
  const int64_t rows = std::max<int64_t>(1, (int64_t{64} << 20) / vocab);
  return std::min(n, rows);
}

// ptr + offset, or null for a tensor the model does not have.
template <typename P>
P* offset_or_null(P* ptr, int64_t offset) {
  return ptr == nullptr ? nullptr : ptr + offset;
}

// fn(expert, first row, row count) for every expert of num_experts with rows, from the host copy
// of the offsets.
template <typename Fn>
void for_each_expert_rows(const int32_t* offsets, int64_t num_experts, Fn&& fn) {
  for (size_t e = 0; e < static_cast<size_t>(num_experts); ++e) {
    const int64_t begin = offsets[e], count = offsets[e + 1] - offsets[e];
    if (count > 0) fn(static_cast<int64_t>(e), begin, count);
  }
}

}  // namespace

Recompute parse_recompute(const std::string& name) {
  if (name == "none") return Recompute::kNone;
  if (name == "selective") return Recompute::kSelective;
  MF_FAIL("unknown activation recompute '{}' (none, selective)", name);
}

GpuTransformer::GpuTransformer(const ModelConfig& config, Recompute recompute, ExpertShard experts)
    : config_(config),
      layout_(config, experts),
      recompute_(recompute),
      scratch_(std::make_unique<Scratch>()) {
  validate_model_config(config_);
  for (int64_t l = 0; l < config_.num_layers; ++l) num_moe_layers_ += config_.layer_is_moe(l);
  grouped_experts_ =
      config_.is_moe() &&
      grouped_.available({config_.num_experts, config_.hidden_size, config_.moe_intermediate_size});
  // A blocking stream, so the synchronous copies of DeviceBuffer (legacy stream) order with it.
  MF_CUDA_CHECK(cudaStreamCreate(&stream_));
  params_.resize(static_cast<size_t>(layout_.num_params()));
  params_bf16_.resize(params_.size());
  grads_.resize(params_.size());
  params_.fill_zero(stream_);
  params_bf16_.fill_zero(stream_);
  grads_.fill_zero(stream_);
  const RopeTable table =
      make_rope_table(config_.max_position_embeddings, config_.head_dim, config_.rope_theta);
  rope_cos_.upload(table.cos);
  rope_sin_.upload(table.sin);
  layers_.resize(static_cast<size_t>(config_.num_layers));
  find_accumulated_ranges();
  find_grad_ready_ranges();
}

void GpuTransformer::find_grad_ready_ranges() {
  const int64_t num_layers = config_.num_layers;
  auto layer_begin = [&](int64_t l) {
    return l < num_layers ? layout_.layer(l).input_norm : layout_.final_norm();
  };
  auto push = [&](int64_t begin, int64_t end) {
    grad_ready_ranges_.push_back({begin, end - begin});
  };
  push(layout_.final_norm(), layout_.num_params());
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const LayerOffsets& o = layout_.layer(l);
    const int64_t ffn_begin = config_.layer_is_moe(l) ? o.router : o.mlp_gate;
    push(ffn_begin, layer_begin(l + 1));
    push(layer_begin(l), ffn_begin);
  }
  push(0, layer_begin(0));
}

void GpuTransformer::find_accumulated_ranges() {
  const int64_t h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const int64_t num_experts = config_.num_experts, f = config_.moe_intermediate_size;
  const int64_t ffn = config_.intermediate_size, shared = config_.shared_expert_intermediate_size;
  std::vector<std::pair<int64_t, int64_t>> assigned;
  const auto add = [&](int64_t offset, int64_t count) {
    if (offset >= 0) assigned.emplace_back(offset, count);
  };
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerOffsets& o = layout_.layer(l);
    add(o.router, num_experts * h);
    // Under tensor parallelism a backward writes this rank's slices of the split weights only:
    // their other parts must be zeros, so those weights count as accumulated, whole.
    if (tp_ != nullptr) continue;
    add(o.q_proj, qd * h);
    add(o.k_proj, kvd * h);
    add(o.v_proj, kvd * h);
    add(o.o_proj, h * qd);
    add(o.mlp_gate, ffn * h);
    add(o.mlp_up, ffn * h);
    add(o.mlp_down, h * ffn);
    // The shared expert's projections; its sigmoid gate's [1, h] gradient accumulates.
    add(o.shared_gate, shared * h);
    add(o.shared_up, shared * h);
    add(o.shared_down, h * shared);
    if (grouped_experts_ && o.experts_gate >= 0) {
      // This rank's experts (the layout holds no others).
      add(o.experts_gate, num_local_experts() * f * h);
      add(o.experts_up, num_local_experts() * f * h);
      add(o.experts_down, num_local_experts() * h * f);
    }
  }
  // Tied or not: the head's first chunk assigns; a tied embedding's backward adds to it later.
  add(layout_.lm_head(), config_.vocab_size * h);
  std::sort(assigned.begin(), assigned.end());
  int64_t next = 0;
  for (const auto& [offset, count] : assigned) {
    if (offset > next) accumulated_ranges_.emplace_back(next, offset - next);
    next = std::max(next, offset + count);
  }
  if (next < layout_.num_params())
    accumulated_ranges_.emplace_back(next, layout_.num_params() - next);
}

GpuTransformer::~GpuTransformer() {
  // A graph waits for its last replay on stream_, so before the stream goes.
  graphs_.clear();
  if (expert_stream_ != nullptr) {
    cudaStreamSynchronize(expert_stream_);
    cudaStreamDestroy(expert_stream_);
  }
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
}

void GpuTransformer::set_cuda_graphs(bool enabled) {
  if (enabled) {
    MF_CHECK(ep_ == nullptr,
             "CUDA graphs capture one GPU's step; under expert parallelism the exchanges and the "
             "two streams run eagerly");
    MF_CHECK(tp_ == nullptr,
             "CUDA graphs capture one GPU's step; under tensor parallelism (parallel.layout "
             "\"tp\") the exchanges run eagerly");
    MF_CHECK(grouped_experts_ || !config_.is_moe(),
             "CUDA graphs need the grouped expert GEMMs (the per-expert GEMMs read their row "
             "ranges on the host every layer; MOEFORGE_GROUPED_GEMM=0 or a GPU without them)");
  } else {
    graphs_.clear();
  }
  graphs_enabled_ = enabled;
}

void GpuTransformer::synchronize() const {
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuTransformer::upload_flat(DeviceBuffer<float>& dst, const std::vector<float>& host,
                                 const char* what) {
  MF_CHECK(static_cast<int64_t>(host.size()) == layout_.num_params(),
           "{}: {} values for a model of {} parameters", what, host.size(), layout_.num_params());
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  copy_to_device(dst.data(), host.data(), host.size() * sizeof(float));
}

void GpuTransformer::pad_flat_buffers(int64_t length) {
  MF_CHECK(length >= layout_.num_params(),
           "flat buffers of {} elements cannot hold the model's {} parameters", length,
           layout_.num_params());
  // The graphs point at the buffers this replaces.
  graphs_.clear();
  const auto grown = [&](auto& buffer) {
    using Buffer = std::remove_reference_t<decltype(buffer)>;
    Buffer padded;
    padded.resize(static_cast<size_t>(length));
    padded.fill_zero(stream_);
    MF_CUDA_CHECK(
        cudaMemcpyAsync(padded.data(), buffer.data(),
                        static_cast<size_t>(layout_.num_params()) * sizeof(*buffer.data()),
                        cudaMemcpyDeviceToDevice, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    buffer.swap(padded);
  };
  grown(params_);
  grown(params_bf16_);
  grown(grads_);
}

void GpuTransformer::upload_params(const std::vector<float>& host) {
  upload_flat(params_, host, "upload_params");
  refresh_bf16_params();
}

void GpuTransformer::refresh_bf16_params() {
  cast_to_bf16(params_bf16_.data(), params_.data(), layout_.num_params(), stream_);
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::vector<GradRange> GpuTransformer::fp32_weight_ranges() const {
  std::vector<GradRange> ranges;
  for (const ParamSpec& spec : layout_.specs()) {
    if (spec.shape.size() != 1 && spec.offset != layout_.embed_tokens()) continue;
    if (!ranges.empty() && ranges.back().offset + ranges.back().count == spec.offset) {
      ranges.back().count += spec.numel;
    } else {
      ranges.push_back(GradRange{spec.offset, spec.numel});
    }
  }
  return ranges;
}

std::vector<float> GpuTransformer::download_params() const {
  return download_flat(params_);
}

std::vector<float> GpuTransformer::download_grads() const {
  return download_flat(grads_);
}

std::vector<float> GpuTransformer::download_flat(const DeviceBuffer<float>& src) const {
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<float> host(static_cast<size_t>(layout_.num_params()));
  copy_to_host(host.data(), src.data(), host.size() * sizeof(float));
  return host;
}

void GpuTransformer::upload_grads(const std::vector<float>& host) {
  upload_flat(grads_, host, "upload_grads");
}

void GpuTransformer::zero_grads() {
  grads_.fill_zero(stream_);
}

void GpuTransformer::resize(int64_t batch, int64_t seq) {
  if (batch == batch_ && seq == seq_) return;
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  batch_ = batch;
  seq_ = seq;
  n_ = batch * seq;
  ep_chunks_ = overlap_chunks_for(n_);
  const auto n = static_cast<size_t>(n_);
  const auto h = static_cast<size_t>(config_.hidden_size);
  const auto qd = static_cast<size_t>(config_.q_dim()), kvd = static_cast<size_t>(config_.kv_dim());
  const auto num_experts = static_cast<size_t>(config_.num_experts);
  const auto k = static_cast<size_t>(config_.num_experts_per_tok);
  const auto f = static_cast<size_t>(config_.moe_intermediate_size);
  const auto ffn = static_cast<size_t>(config_.intermediate_size);
  const auto shared = static_cast<size_t>(config_.shared_expert_intermediate_size);
  // The tokens an MoE layer routes (the group's under expert and tensor parallelism).
  const size_t ng = n * static_cast<size_t>(group_size());
  const bool sp = expert_parallel_size() > 1;
  // Tensor parallelism: the FFNs see the group's tokens (nf) on 1 / tp of their columns.
  const bool tp = tp_ != nullptr;
  const auto tp_size = static_cast<size_t>(tensor_parallel_size());
  const size_t nf = n * tp_size;
  const size_t f_cols = f / tp_size, ffn_cols = ffn / tp_size, shared_cols = shared / tp_size;
  size_t max_rows = n, max_ffn = 0;
  bool has_a2a = false;  // some MoE layer takes the all-to-all dispatch
  // The most ints of an all-to-all dispatch's maps: n * k assignments, at most ng * k rows
  // received.
  const auto a2a_ints =
      static_cast<size_t>(a2a_map_ints(static_cast<int64_t>(n * k), static_cast<int64_t>(ng * k),
                                       num_local_experts(), config_.num_experts));
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    Layer& a = layers_[static_cast<size_t>(l)];
    const bool keep = recompute_ == Recompute::kNone;
    a.x_in.resize(n * h);
    a.ln1.resize(keep ? n * h : 0);
    a.rstd1.resize(n);
    if (config_.qk_norm) {
      a.q_lin.resize(n * qd);
      a.k_lin.resize(n * kvd);
      a.rstd_q.resize(n * static_cast<size_t>(config_.num_heads));
      a.rstd_k.resize(n * static_cast<size_t>(config_.num_kv_heads));
    }
    a.q.resize(n * qd);
    a.k.resize(n * kvd);
    a.v.resize(n * kvd);
    a.att.resize(n * qd);
    a.lse.resize(n * static_cast<size_t>(config_.num_heads));
    a.x_mid.resize(n * h);
    a.ln2.resize(keep ? n * h : 0);
    a.rstd2.resize(n);
    a.ln1_group.resize(tp ? nf * h : 0);
    a.q_heads.resize(sp ? n * qd : 0);
    a.k_heads.resize(sp ? n * kvd : 0);
    a.v_heads.resize(sp ? n * kvd : 0);
    a.att_heads.resize(sp ? n * qd : 0);
    if (config_.layer_is_moe(l)) {
      // The all-to-all dispatch routes this rank's tokens; its experts see at most the group's
      // tokens * k rows, as the all-gather dispatch's.
      const bool a2a = a2a_layer(l);
      const size_t routed = a2a ? n : ng;
      a.router_logits.resize(routed * num_experts);
      a.probs.resize(routed * num_experts);
      a.expert_idx.resize(routed * k);
      a.gates.resize(routed * k);
      a.expert_counts.resize(a2a ? 0 : num_experts);
      a.host_counts.resize(num_experts);
      a.expert_offsets.resize(a2a ? 0 : static_cast<size_t>(ep_chunks_) * (num_experts + 1));
      a.host_offsets.resize(static_cast<size_t>(ep_chunks_) * (num_experts + 1));
      a.assignment_row.resize(a2a ? 0 : ng * k);
      a.row_token.resize(a2a ? 0 : ng * k);
      a.ln2_group.resize((sp && !a2a) || tp ? ng * h : 0);
      a.local_idx.resize(sp && !a2a ? ng * k : 0);
      a.a2a_maps_buffer.resize(a2a ? a2a_ints : 0);
      a.a2a_received.resize(a2a ? ng * k * h : 0);
      a.a2a_returned.resize(a2a ? n * k * h : 0);
      a.h_gate.resize(ng * k * f_cols);
      a.h_up.resize(ng * k * f_cols);
      a.h_act.resize(keep ? ng * k * f_cols : 0);
      a.y_rows.resize(a2a ? 0 : ng * k * h);
      has_a2a = has_a2a || a2a;
      a.shared_gate.resize(nf * shared_cols);
      a.shared_up.resize(nf * shared_cols);
      a.shared_act.resize(keep ? nf * shared_cols : 0);
      a.shared_out.resize(shared > 0 ? nf * h : 0);
      a.shared_score.resize(shared > 0 ? nf : 0);
      max_rows = std::max(max_rows, ng * k);
      max_ffn = std::max({max_ffn, ng * k * f_cols, nf * shared_cols});
    } else {
      a.ln2_group.resize(tp ? nf * h : 0);
      a.h_gate.resize(nf * ffn_cols);
      a.h_up.resize(nf * ffn_cols);
      a.h_act.resize(keep ? nf * ffn_cols : 0);
      max_ffn = std::max(max_ffn, nf * ffn_cols);
    }
  }
  if (recompute_ == Recompute::kSelective) {
    scratch_->ln1.resize(n * h);
    scratch_->ln2.resize(n * h);
    scratch_->h_act.resize(max_ffn);
    scratch_->shared_act.resize(nf * shared_cols);
  }
  scratch_->rows.resize(config_.is_moe() ? max_rows * h : 0);
  // One row map at a time: n tokens, or under expert parallelism a chunk's over the local experts.
  scratch_->row_map.resize(
      config_.is_moe() ? static_cast<size_t>(row_map_scratch_ints(
                             chunk_tokens() * config_.num_experts_per_tok, num_local_experts()))
                       : 0);
  for (Layer& a : layers_) {
    const bool keep = recompute_ == Recompute::kNone;
    a.ln1_ptr = keep ? a.ln1.data() : scratch_->ln1.data();
    a.ln2_ptr = keep ? a.ln2.data() : scratch_->ln2.data();
    a.h_act_ptr = keep ? a.h_act.data() : scratch_->h_act.data();
    a.shared_act_ptr = keep ? a.shared_act.data() : scratch_->shared_act.data();
  }
  Scratch& s = *scratch_;
  s.tokens.resize(n);
  s.targets.resize(n);
  s.positions.resize(n);
  s.x_out.resize(n * h);
  s.lnf.resize(n * h);
  s.rstdf.resize(n);
  const auto chunk = static_cast<size_t>(head_chunk_rows(n_, config_.vocab_size));
  s.logits.resize(chunk * static_cast<size_t>(config_.vocab_size));
  s.dlogits.resize(chunk * static_cast<size_t>(config_.vocab_size));
  s.losses.resize(n);
  s.router_losses.resize(std::max<size_t>(1, 2 * static_cast<size_t>(num_moe_layers_)));
  if (config_.is_moe()) {
    s.router_scratch.resize(static_cast<size_t>(router_loss_scratch_floats(
        RouterShape{moe_tokens(), config_.num_experts, config_.num_experts_per_tok, true})));
    s.drouter.resize(ng * num_experts);
    s.dgates.resize(ng * k);
    s.shared_dlogit.resize(shared > 0 ? nf : 0);
    const size_t ranks = static_cast<size_t>(expert_parallel_size());
    s.a2a_send.resize(has_a2a ? n * k * h : 0);
    s.a2a_recv.resize(has_a2a ? ng * k * h : 0);
    s.a2a_loads.resize(has_a2a ? ranks * num_experts : 0);
    s.a2a_sums.resize(has_a2a ? num_experts + 1 : 0);
    s.a2a_routing.resize(has_a2a ? n * k + ranks * num_experts : 0);
    s.a2a_staging.resize(has_a2a ? a2a_ints : 0);
  }
  // The exchanges of the group's tokens: expert parallelism's MoE layers, every layer under tensor
  // parallelism.
  const bool moe_sp = sp && config_.is_moe();
  s.group_f32.resize(moe_sp || tp ? ng * h : 0);
  s.group_bf16.resize(tp                                                     ? nf * h
                      : moe_sp && ep_exchange_ == GradReduceDtype::kBfloat16 ? (ng + n) * h
                                                                             : 0);
  s.tp_positions.resize(tp ? nf : 0);
  s.tp_stage_f32.resize(tp ? nf * h : 0);
  s.tp_stage_bf16.resize(tp && batch > 1 ? nf * h : 0);
  // The largest of the slices pack_ffn_slices and o_proj's pack.
  size_t max_slices = 0;
  if (tp) {
    max_slices = h * qd / tp_size;
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      max_slices = std::max(max_slices, config_.layer_is_moe(l)
                                            ? 3 * num_experts * f_cols * h + h * shared_cols
                                            : h * ffn_cols);
    }
  }
  s.tp_weights.resize(max_slices);
  s.tp_grads.resize(max_slices);
  s.sums.resize(1);
  s.dce.resize(1);
  s.sum_scratch.resize(static_cast<size_t>(reduction_scratch_doubles(n_)));
  s.dres.resize(n * h);
  s.dln.resize(n * h);
  s.dres_bf16.resize(n * h);
  s.datt.resize(n * qd);
  s.dq.resize(n * qd);
  s.dk.resize(n * kvd);
  s.dv.resize(n * kvd);
  s.qkv.resize(config_.qk_norm || tp ? 0 : n * (qd + 2 * kvd));
  if (config_.qk_norm) {
    s.dq_lin.resize(n * qd);
    s.dk_lin.resize(n * kvd);
  }
  s.drows.resize(max_rows * h);
  s.exchange_send.resize(sp ? n * (qd + 2 * kvd) : 0);
  s.exchange_recv.resize(sp ? n * (qd + 2 * kvd) : 0);
  s.datt_heads.resize(sp ? n * qd : 0);
  s.dq_heads.resize(sp ? n * qd : 0);
  s.dk_heads.resize(sp ? n * kvd : 0);
  s.dv_heads.resize(sp ? n * kvd : 0);
  s.counted.resize(1);
  if (s.wait_word.size() == 0) {
    s.wait_word.resize(1);
    s.wait_word.fill_zero(stream_);
  }
  s.dh_gate.resize(max_ffn);
  s.dh_up.resize(max_ffn);
}

void GpuTransformer::attention_forward(int64_t l, int64_t batch, int64_t seq) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t n = n_, h = config_.hidden_size;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  rmsnorm_forward(a.ln1_ptr, a.rstd1.data(), a.x_in.data(), w(o.input_norm), n, h, eps, stream_);
  if (tp_ != nullptr) {
    // ln1 -> x_mid through this rank's heads (gpu_transformer_tensor_parallel.cpp).
    tp_attention_forward(l, batch, seq);
  } else {
    attention_core_forward(l, batch, seq);
  }
  rmsnorm_forward(a.ln2_ptr, a.rstd2.data(), a.x_mid.data(), w(o.post_attention_norm), n, h, eps,
                  stream_);
}

void GpuTransformer::attention_core_forward(int64_t l, int64_t batch, int64_t seq) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t n = n_, h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const int64_t d = config_.head_dim;
  if (packed_qkv(config_, o)) {
    // One GEMM into packed rows [q | k | v], then RoPE from them into q and k, and a copy of v.
    const int64_t width = qd + 2 * kvd;
    bf16* qkv = s.qkv.data();
    blas_.linear_forward(qkv, OutType::kBf16, a.ln1_ptr, wb(o.q_proj), w(o.q_bias), n, h, width,
                         false, stream_);
    rope_forward_strided(a.q.data(), qd, qkv, width, s.positions.data(), rope_cos_.data(),
                         rope_sin_.data(), n, config_.num_heads, d, stream_);
    rope_forward_strided(a.k.data(), kvd, qkv + qd, width, s.positions.data(), rope_cos_.data(),
                         rope_sin_.data(), n, config_.num_kv_heads, d, stream_);
    copy_rows_async(a.v.data(), kvd, qkv + qd + kvd, width, n, kvd, stream_);
  } else {
    attention_projections_unpacked(l, attention_shard(l));
  }
  if (ep_ != nullptr) {
    ulysses_attention_forward(l, batch, seq);
  } else {
    attention_.forward(a.att.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(),
                       AttentionShape{batch, seq, config_.num_heads, config_.num_kv_heads, d},
                       stream_);
  }
  // x_mid = x_in + att W_o^T, the residual added in the GEMM's epilogue.
  blas_.linear_forward_add(a.x_mid.data(), a.x_in.data(), a.att.data(), wb(o.o_proj), n, qd, h,
                           stream_);
}

GpuTransformer::AttentionShard GpuTransformer::attention_shard(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  if (tp_ == nullptr) {
    const int32_t* positions = scratch_->positions.data();
    return {n_, config_.num_heads, config_.num_kv_heads, 0, 0, a.ln1_ptr, positions};
  }
  const int64_t ranks = tp_->size(), rank = tp_->rank(), d = config_.head_dim;
  const int64_t heads = config_.num_heads / ranks, kv_heads = config_.num_kv_heads / ranks;
  return {n_ * ranks,
          heads,
          kv_heads,
          rank * heads * d,
          rank * kv_heads * d,
          a.ln1_group.data(),
          scratch_->tp_positions.data()};
}

void GpuTransformer::attention_projections_unpacked(int64_t l, const AttentionShard& shard) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t rows = shard.rows, h = config_.hidden_size, d = config_.head_dim;
  const int64_t q_cols = shard.num_heads * d, kv_cols = shard.num_kv_heads * d;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  bf16* q_pre = config_.qk_norm ? a.q_lin.data() : a.q.data();
  bf16* k_pre = config_.qk_norm ? a.k_lin.data() : a.k.data();
  // This rank's heads: rows [begin, begin + cols) of each projection and of its bias.
  blas_.linear_forward(q_pre, OutType::kBf16, shard.x, wb(o.q_proj) + shard.q_begin * h,
                       offset_or_null(w(o.q_bias), shard.q_begin), rows, h, q_cols, false, stream_);
  blas_.linear_forward(k_pre, OutType::kBf16, shard.x, wb(o.k_proj) + shard.kv_begin * h,
                       offset_or_null(w(o.k_bias), shard.kv_begin), rows, h, kv_cols, false,
                       stream_);
  blas_.linear_forward(a.v.data(), OutType::kBf16, shard.x, wb(o.v_proj) + shard.kv_begin * h,
                       offset_or_null(w(o.v_bias), shard.kv_begin), rows, h, kv_cols, false,
                       stream_);
  if (config_.qk_norm) {
    rmsnorm_forward(a.q.data(), a.rstd_q.data(), a.q_lin.data(), w(o.q_norm),
                    rows * shard.num_heads, d, eps, stream_);
    rmsnorm_forward(a.k.data(), a.rstd_k.data(), a.k_lin.data(), w(o.k_norm),
                    rows * shard.num_kv_heads, d, eps, stream_);
  }
  rope_forward(a.q.data(), a.q.data(), shard.positions, rope_cos_.data(), rope_sin_.data(), rows,
               shard.num_heads, d, stream_);
  rope_forward(a.k.data(), a.k.data(), shard.positions, rope_cos_.data(), rope_sin_.data(), rows,
               shard.num_kv_heads, d, stream_);
}

void GpuTransformer::shared_expert_forward(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  const SwigluWeights sw = swiglu_weights(l, true);
  const int64_t rows = ffn_rows();
  swiglu_ffn_forward(ffn_input(l), sw, rows, a.shared_gate.data(), a.shared_up.data(),
                     a.shared_act_ptr);
  blas_.linear_forward(a.shared_out.data(), OutType::kBf16, a.shared_act_ptr, sw.down, nullptr,
                       rows, sw.width, config_.hidden_size, false, stream_);
}

void GpuTransformer::swiglu_ffn_forward(const bf16* x, const SwigluWeights& w, int64_t rows,
                                        bf16* gate, bf16* up, bf16* act) {
  const int64_t h = config_.hidden_size;
  blas_.linear_forward(gate, OutType::kBf16, x, w.gate, nullptr, rows, h, w.width, false, stream_);
  blas_.linear_forward(up, OutType::kBf16, x, w.up, nullptr, rows, h, w.width, false, stream_);
  swiglu_forward(act, gate, up, rows * w.width, stream_);
}

GpuTransformer::SwigluWeights GpuTransformer::swiglu_weights(int64_t l, bool shared) {
  const LayerOffsets& o = layout_.layer(l);
  const int64_t gate = shared ? o.shared_gate : o.mlp_gate;
  const int64_t up = shared ? o.shared_up : o.mlp_up;
  const int64_t down = shared ? o.shared_down : o.mlp_down;
  const int64_t ffn = shared ? config_.shared_expert_intermediate_size : config_.intermediate_size;
  if (tp_ == nullptr) return {wb(gate), wb(up), wb(down), g(gate), g(up), g(down), ffn, false};
  // This rank's rows of gate and up in place, its columns of down where pack_ffn_slices put them.
  const ColumnSlice slice = ffn_slice(ffn);
  const int64_t rows_at = slice.begin * config_.hidden_size;
  const int64_t down_at = shared ? shared_down_slice_at() : 0;
  return {wb(gate) + rows_at,
          wb(up) + rows_at,
          scratch_->tp_weights.data() + down_at,
          g(gate) + rows_at,
          g(up) + rows_at,
          scratch_->tp_grads.data() + down_at,
          slice.width,
          true};
}

const bf16* GpuTransformer::ffn_input(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  return tp_ != nullptr ? a.ln2_group.data() : a.ln2_ptr;
}

void GpuTransformer::expert_forward(bf16* y, const bf16* x, const bf16* w, int64_t in, int64_t out,
                                    const ExpertRows& rows, cudaStream_t stream) {
  if (grouped_experts_) {
    grouped_.forward(y, x, w, rows.device, {num_local_experts(), in, out}, stream);
    return;
  }
  for_each_expert_rows(
      rows.host, num_local_experts(), [&](int64_t e, int64_t begin, int64_t count) {
        blas_.linear_forward(y + begin * out, OutType::kBf16, x + begin * in, w + e * out * in,
                             nullptr, count, in, out, false, stream);
      });
}

void GpuTransformer::expert_backward_input(bf16* dx, const bf16* dy, const bf16* w, int64_t in,
                                           int64_t out, bool accumulate, const ExpertRows& rows,
                                           cudaStream_t stream) {
  if (grouped_experts_) {
    grouped_.backward_input(dx, dy, w, rows.device, {num_local_experts(), in, out}, accumulate,
                            stream);
    return;
  }
  for_each_expert_rows(
      rows.host, num_local_experts(), [&](int64_t e, int64_t begin, int64_t count) {
        blas_.linear_backward_input(dx + begin * in, OutType::kBf16, dy + begin * out,
                                    w + e * out * in, count, in, out, accumulate, stream);
      });
}

void GpuTransformer::expert_backward_weight(float* dw, const bf16* dy, const bf16* x, int64_t in,
                                            int64_t out, bool assign, const ExpertRows& rows,
                                            cudaStream_t stream) {
  if (grouped_experts_) {
    grouped_.backward_weight(dw, dy, x, rows.device, {num_local_experts(), in, out}, !assign,
                             stream);
    return;
  }
  for_each_expert_rows(rows.host, num_local_experts(),
                       [&](int64_t e, int64_t begin, int64_t count) {
                         blas_.linear_backward_weight(dw + e * out * in, dy + begin * out,
                                                      x + begin * in, count, in, out, true, stream);
                       });
}

void GpuTransformer::dense_ffn_forward(int64_t l, float* x_out) {
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t n = n_, h = config_.hidden_size;
  // Tensor parallelism: the group's normed tokens, and the down columns packed.
  if (tp_ != nullptr) tp_gather_ffn_input(l);
  const SwigluWeights sw = swiglu_weights(l, false);
  swiglu_ffn_forward(ffn_input(l), sw, ffn_rows(), a.h_gate.data(), a.h_up.data(), a.h_act_ptr);
  if (tp_ == nullptr) {
    // x_out = x_mid + act W_down^T, the residual added in the GEMM's epilogue.
    blas_.linear_forward_add(x_out, a.x_mid.data(), a.h_act_ptr, sw.down, n, sw.width, h, stream_);
    return;
  }
  // The row-parallel down projection's partial sums of the group's tokens, summed onto this rank's.
  float* partial = scratch_->group_f32.data();
  blas_.linear_forward(partial, OutType::kFloat, a.h_act_ptr, sw.down, nullptr, ffn_rows(),
                       sw.width, h, false, stream_);
  tp_reduce_scatter_ffn_output(partial, x_out);
  add_inplace(x_out, a.x_mid.data(), n * h, stream_);
}

void GpuTransformer::head_forward_backward(bool backward) {
  Scratch& s = *scratch_;
  const int64_t n = n_, h = config_.hidden_size, vocab = config_.vocab_size;
  const int64_t chunk = head_chunk_rows(n, vocab);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    blas_.linear_forward(s.logits.data(), OutType::kFloat, s.lnf.data() + r0 * h,
                         wb(layout_.lm_head()), nullptr, rows, h, vocab, false, stream_);
    if (host_logits_ != nullptr) {
      MF_CUDA_CHECK(cudaMemcpyAsync(host_logits_ + r0 * vocab, s.logits.data(),
                                    static_cast<size_t>(rows * vocab) * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
    }
    cross_entropy_forward_backward(s.losses.data() + r0, backward ? s.dlogits.data() : nullptr,
                                   s.logits.data(), s.targets.data() + r0, rows, vocab,
                                   s.dce.data(), stream_);
    if (!backward) continue;
    blas_.linear_backward_input(s.dln.data() + r0 * h, OutType::kFloat, s.dlogits.data(),
                                wb(layout_.lm_head()), rows, h, vocab, false, stream_);
    blas_.linear_backward_weight(g(layout_.lm_head()), s.dlogits.data(), s.lnf.data() + r0 * h,
                                 rows, h, vocab, accumulate_grads_ || r0 > 0, stream_);
  }
}

void GpuTransformer::recompute_ffn_inputs(int64_t l) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t n = n_, h = config_.hidden_size, tp_size = tensor_parallel_size();
  rmsnorm_forward(a.ln2_ptr, a.rstd2.data(), a.x_mid.data(), w(o.post_attention_norm), n, h,
                  static_cast<float>(config_.rms_norm_eps), stream_);
  // The SwiGLU outputs as the forward computed them: under tensor parallelism the group's tokens'
  // on this rank's columns.
  if (!config_.layer_is_moe(l)) {
    swiglu_forward(a.h_act_ptr, a.h_gate.data(), a.h_up.data(),
                   ffn_rows() * (config_.intermediate_size / tp_size), stream_);
    return;
  }
  // Each chunk's rows of this rank's experts, as the forward ran them (moe_chunk_forward).
  const int64_t rows = chunk_tokens() * config_.num_experts_per_tok;
  const int64_t f = expert_weights(l).ffn;
  for (int64_t c = 0; c < ep_chunks_; ++c) {
    const int32_t* used_rows = chunk_expert_rows(l, c).device + num_local_experts();
    swiglu_forward(a.h_act_ptr + c * rows * f, a.h_gate.data() + c * rows * f,
                   a.h_up.data() + c * rows * f, used_rows, rows, f, stream_);
  }
  if (config_.shared_expert_intermediate_size > 0) {
    swiglu_forward(a.shared_act_ptr, a.shared_gate.data(), a.shared_up.data(),
                   ffn_rows() * (config_.shared_expert_intermediate_size / tp_size), stream_);
  }
}

void GpuTransformer::recompute_attention_inputs(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  rmsnorm_forward(a.ln1_ptr, a.rstd1.data(), a.x_in.data(), w(layout_.layer(l).input_norm), n_,
                  config_.hidden_size, static_cast<float>(config_.rms_norm_eps), stream_);
}

void GpuTransformer::shared_expert_backward(int64_t l) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t rows = ffn_rows(), h = config_.hidden_size;
  const bf16* x = ffn_input(l);
  // The gradient of the layer's output and the input gradient the shared expert adds to: this
  // rank's tokens' (dres, dln), or under tensor parallelism the group's (gathered into group_f32,
  // and tp_stage_f32 before its reduce-scatter). The gate first, then the projections as in
  // dense_ffn_backward. dres_bf16 (group_bf16 under tensor parallelism) is free in an MoE layer's
  // backward: it takes the gradient of the shared expert's output; dh_gate and dh_up are free
  // once the routed experts are done.
  const bool tp = tp_ != nullptr;
  const float* dout = tp ? s.group_f32.data() : s.dres.data();
  float* dx = tp ? s.tp_stage_f32.data() : s.dln.data();
  bf16* dshared_out = tp ? s.group_bf16.data() : s.dres_bf16.data();
  shared_expert_gate_backward(dshared_out, s.shared_dlogit.data(), dx, dout, a.shared_out.data(),
                              a.shared_score.data(), wb(o.shared_expert_gate), rows, h, stream_);
  shared_expert_gate_backward_weight(g(o.shared_expert_gate), s.shared_dlogit.data(), x, rows, h,
                                     stream_);
  swiglu_ffn_backward(dshared_out, x, a.shared_act_ptr, a.shared_gate.data(), a.shared_up.data(),
                      swiglu_weights(l, true), rows, dx, true);
}

void GpuTransformer::dense_ffn_backward(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  if (tp_ != nullptr) {
    tp_dense_ffn_backward(l);
    return;
  }
  swiglu_ffn_backward(scratch_->dres_bf16.data(), a.ln2_ptr, a.h_act_ptr, a.h_gate.data(),
                      a.h_up.data(), swiglu_weights(l, false), n_, scratch_->dln.data(), false);
}

void GpuTransformer::swiglu_ffn_backward(const bf16* dy, const bf16* x, const bf16* act,
                                         const bf16* gate, const bf16* up, const SwigluWeights& w,
                                         int64_t rows, float* dx, bool add_to_dx) {
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, width = w.width;
  blas_.linear_backward_input(s.dh_gate.data(), OutType::kBf16, dy, w.down, rows, width, h, false,
                              stream_);
  blas_.linear_backward_weight(w.ddown, dy, act, rows, width, h,
                               accumulate_grads_ && !w.packed_down, stream_);
  swiglu_backward(s.dh_gate.data(), s.dh_up.data(), s.dh_gate.data(), gate, up, rows * width,
                  stream_);
  blas_.linear_backward_input(dx, OutType::kFloat, s.dh_gate.data(), w.gate, rows, h, width,
                              add_to_dx, stream_);
  blas_.linear_backward_input(dx, OutType::kFloat, s.dh_up.data(), w.up, rows, h, width, true,
                              stream_);
  blas_.linear_backward_weight(w.dgate, s.dh_gate.data(), x, rows, h, width, accumulate_grads_,
                               stream_);
  blas_.linear_backward_weight(w.dup, s.dh_up.data(), x, rows, h, width, accumulate_grads_,
                               stream_);
}

void GpuTransformer::attention_backward(int64_t l, int64_t batch, int64_t seq) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  if (tp_ != nullptr) {
    // dres_bf16 -> dln through this rank's heads (gpu_transformer_tensor_parallel.cpp).
    tp_attention_backward(l, batch, seq);
  } else {
    attention_core_backward(l, batch, seq);
  }
  rmsnorm_backward(s.dres.data(), g(o.input_norm), s.dln.data(), a.x_in.data(), w(o.input_norm),
                   a.rstd1.data(), n_, config_.hidden_size, true, stream_,
                   residual_grad_bf16_for(l - 1));
}

void GpuTransformer::attention_core_backward(int64_t l, int64_t batch, int64_t seq) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t n = n_, h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const int64_t d = config_.head_dim;
  blas_.linear_backward_input(s.datt.data(), OutType::kBf16, s.dres_bf16.data(), wb(o.o_proj), n,
                              qd, h, false, stream_);
  blas_.linear_backward_weight(g(o.o_proj), s.dres_bf16.data(), a.att.data(), n, qd, h,
                               accumulate_grads_, stream_);
  if (ep_ != nullptr) {
    ulysses_attention_backward(l, batch, seq);
  } else {
    attention_.backward(s.dq.data(), s.dk.data(), s.dv.data(), s.datt.data(), a.q.data(),
                        a.k.data(), a.v.data(), a.att.data(), a.lse.data(),
                        AttentionShape{batch, seq, config_.num_heads, config_.num_kv_heads, d},
                        stream_);
  }
  if (packed_qkv(config_, o)) {
    // The gradient of the packed projection [dq | dk | dv], then one GEMM each for dx and dW.
    const int64_t width = qd + 2 * kvd;
    bf16* dqkv = s.qkv.data();
    rope_backward_strided(dqkv, width, s.dq.data(), qd, s.positions.data(), rope_cos_.data(),
                          rope_sin_.data(), n, config_.num_heads, d, stream_);
    rope_backward_strided(dqkv + qd, width, s.dk.data(), kvd, s.positions.data(), rope_cos_.data(),
                          rope_sin_.data(), n, config_.num_kv_heads, d, stream_);
    copy_rows_async(dqkv + qd + kvd, width, s.dv.data(), kvd, n, kvd, stream_);
    if (config_.attention_bias) column_sum_accumulate(g(o.q_bias), dqkv, n, width, stream_);
    blas_.linear_backward_input(s.dln.data(), OutType::kFloat, dqkv, wb(o.q_proj), n, h, width,
                                false, stream_);
    blas_.linear_backward_weight(g(o.q_proj), dqkv, a.ln1_ptr, n, h, width, accumulate_grads_,
                                 stream_);
  } else {
    attention_projections_backward_unpacked(l, attention_shard(l), s.dln.data());
  }
}

bf16* GpuTransformer::residual_grad_bf16_for(int64_t l) {
  const bool dense_ffn_next = l >= 0 && !config_.layer_is_moe(l);
  return dense_ffn_next ? scratch_->dres_bf16.data() : nullptr;
}

void GpuTransformer::attention_projections_backward_unpacked(int64_t l, const AttentionShard& shard,
                                                             float* dx) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t rows = shard.rows, h = config_.hidden_size, d = config_.head_dim;
  const int64_t q_cols = shard.num_heads * d, kv_cols = shard.num_kv_heads * d;
  rope_backward(s.dq.data(), s.dq.data(), shard.positions, rope_cos_.data(), rope_sin_.data(), rows,
                shard.num_heads, d, stream_);
  rope_backward(s.dk.data(), s.dk.data(), shard.positions, rope_cos_.data(), rope_sin_.data(), rows,
                shard.num_kv_heads, d, stream_);
  bf16* dq = s.dq.data();
  bf16* dk = s.dk.data();
  if (config_.qk_norm) {
    rmsnorm_backward(s.dq_lin.data(), g(o.q_norm), s.dq.data(), a.q_lin.data(), w(o.q_norm),
                     a.rstd_q.data(), rows * shard.num_heads, d, false, stream_);
    rmsnorm_backward(s.dk_lin.data(), g(o.k_norm), s.dk.data(), a.k_lin.data(), w(o.k_norm),
                     a.rstd_k.data(), rows * shard.num_kv_heads, d, false, stream_);
    dq = s.dq_lin.data();
    dk = s.dk_lin.data();
  }
  if (config_.attention_bias) {
    column_sum_accumulate(g(o.q_bias) + shard.q_begin, dq, rows, q_cols, stream_);
    column_sum_accumulate(g(o.k_bias) + shard.kv_begin, dk, rows, kv_cols, stream_);
    column_sum_accumulate(g(o.v_bias) + shard.kv_begin, s.dv.data(), rows, kv_cols, stream_);
  }
  // This rank's heads' rows of the projections (all of them without tensor parallelism).
  const bf16* wq = wb(o.q_proj) + shard.q_begin * h;
  const bf16* wk = wb(o.k_proj) + shard.kv_begin * h;
  const bf16* wv = wb(o.v_proj) + shard.kv_begin * h;
  blas_.linear_backward_input(dx, OutType::kFloat, dq, wq, rows, h, q_cols, false, stream_);
  blas_.linear_backward_input(dx, OutType::kFloat, dk, wk, rows, h, kv_cols, true, stream_);
  blas_.linear_backward_input(dx, OutType::kFloat, s.dv.data(), wv, rows, h, kv_cols, true,
                              stream_);
  blas_.linear_backward_weight(g(o.q_proj) + shard.q_begin * h, dq, shard.x, rows, h, q_cols,
                               accumulate_grads_, stream_);
  blas_.linear_backward_weight(g(o.k_proj) + shard.kv_begin * h, dk, shard.x, rows, h, kv_cols,
                               accumulate_grads_, stream_);
  blas_.linear_backward_weight(g(o.v_proj) + shard.kv_begin * h, s.dv.data(), shard.x, rows, h,
                               kv_cols, accumulate_grads_, stream_);
}

void GpuTransformer::enqueue_forward_backward(const StepKey& key) {
  Scratch& s = *scratch_;
  const int64_t batch = key.batch, seq = key.seq, n = n_;
  const double dloss = key.dloss;
  const bool backward = dloss != 0.0;
  const int64_t h = config_.hidden_size;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  timer_.mark("embedding", stream_);
  const size_t num_ranges = grad_ready_ranges_.size();
  weights_needed(num_ranges - 1);
  embedding_forward(layers_[0].x_in.data(), s.tokens.data(), w(layout_.embed_tokens()), n, h,
                    stream_);

  int64_t moe_idx = 0;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    float* x_out = l + 1 < config_.num_layers ? layers_[static_cast<size_t>(l) + 1].x_in.data()
                                              : s.x_out.data();
    const size_t ffn_range = 1 + 2 * static_cast<size_t>(config_.num_layers - 1 - l);
    timer_.mark("attention", stream_);
    weights_needed(ffn_range + 1);
    attention_forward(l, batch, seq);
    weights_needed(ffn_range);
    if (config_.layer_is_moe(l)) {
      timer_.mark("moe", stream_);
      moe_forward(l, x_out, s.router_losses.data() + 2 * moe_idx);
      moe_combine(l, x_out);
      ++moe_idx;
    } else {
      timer_.mark("dense_ffn", stream_);
      dense_ffn_forward(l, x_out);
    }
  }
  timer_.mark("head", stream_);
  weights_needed(0);
  rmsnorm_forward(s.lnf.data(), s.rstdf.data(), s.x_out.data(), w(layout_.final_norm()), n, h, eps,
                  stream_);
  head_forward_backward(backward);
  // kAssign: the ranges no weight-gradient GEMM assigns start from zeros. Not before the forward:
  // an optimizer overlapping it may still read the last step's gradients until the forward has
  // waited for every range (weights_needed); the head wrote only assigned ranges.
  if (backward && !accumulate_grads_) {
    for (const auto& [offset, count] : accumulated_ranges_) {
      MF_CUDA_CHECK(cudaMemsetAsync(grads_.data() + offset, 0,
                                    static_cast<size_t>(count) * sizeof(float), stream_));
    }
  }
  sum(s.sums.data(), s.losses.data(), n, s.sum_scratch.data(), stream_);
  if (group() != nullptr) group()->all_reduce_sum(s.sums.data(), 1, CommDType::kFloat64);

  if (backward) {
    const double d_aux = num_moe_layers_ > 0 ? dloss * config_.router_aux_loss_coef /
                                                   static_cast<double>(num_moe_layers_)
                                             : 0.0;
    const double d_z = num_moe_layers_ > 0 ? dloss * config_.router_z_loss_coef /
                                                 static_cast<double>(num_moe_layers_)
                                           : 0.0;
    rmsnorm_backward(s.dres.data(), g(layout_.final_norm()), s.dln.data(), s.x_out.data(),
                     w(layout_.final_norm()), s.rstdf.data(), n, h, false, stream_,
                     residual_grad_bf16_for(config_.num_layers - 1));
    grad_ready(0);
    for (int64_t l = config_.num_layers - 1; l >= 0; --l) {
      Layer& a = layers_[static_cast<size_t>(l)];
      if (recompute_ == Recompute::kSelective) {
        timer_.mark("recompute", stream_);
        recompute_ffn_inputs(l);
      }
      const size_t ready_index = 1 + 2 * static_cast<size_t>(config_.num_layers - 1 - l);
      if (config_.layer_is_moe(l)) {
        timer_.mark("moe_backward", stream_);
        moe_backward(l, static_cast<float>(d_aux), static_cast<float>(d_z));
      } else {
        timer_.mark("dense_ffn_backward", stream_);
        dense_ffn_backward(l);
      }
      grad_ready(ready_index);
      timer_.mark("attention_backward", stream_);
      // The attention backward's first GEMM reads the residual gradient in bf16.
      rmsnorm_backward(s.dres.data(), g(layout_.layer(l).post_attention_norm), s.dln.data(),
                       a.x_mid.data(), w(layout_.layer(l).post_attention_norm), a.rstd2.data(), n,
                       h, true, stream_, s.dres_bf16.data());
      if (recompute_ == Recompute::kSelective) recompute_attention_inputs(l);
      attention_backward(l, batch, seq);
      grad_ready(ready_index + 1);
    }
    timer_.mark("embedding_backward", stream_);
    // The groups padded to n (forward_backward): a fixed launch whatever the distinct tokens.
    embedding_backward(g(layout_.embed_tokens()), s.dres.data(), s.group_ids.data(),
                       s.group_offsets.data(), s.group_positions.data(), n, h, stream_);
    grad_ready(grad_ready_ranges_.size() - 1);
  }
}

void GpuTransformer::replay_or_capture(const StepKey& key, const std::function<void()>& enqueue) {
  auto it = std::find_if(graphs_.begin(), graphs_.end(),
                         [&](const auto& entry) { return entry.first == key; });
  if (it == graphs_.end()) it = graphs_.emplace(graphs_.end(), key, ReplayedWork{});
  if (it->second.run(stream_, enqueue)) ++graph_captures_;
}

LossBreakdown GpuTransformer::forward_backward(const int32_t* tokens, const int32_t* targets,
                                               int64_t batch, int64_t seq, double dloss,
                                               GradMode grad_mode, double ce_count) {
  MF_CHECK(batch > 0 && seq > 0, "forward needs a non-empty batch, got [{}, {}]", batch, seq);
  MF_CHECK(seq * group_size() <= config_.max_position_embeddings,
           "sequence length {} exceeds max_position_embeddings {}", seq * group_size(),
           config_.max_position_embeddings);
  const int64_t n = batch * seq;
  int64_t num_counted = 0;
  for (int64_t i = 0; i < n; ++i) {
    MF_CHECK(tokens[i] >= 0 && tokens[i] < config_.vocab_size,
             "token {} at position {} is outside the vocabulary [0, {})", tokens[i], i,
             config_.vocab_size);
    MF_CHECK(targets[i] >= -1 && targets[i] < config_.vocab_size,
             "target {} at position {} is outside the vocabulary [0, {}) and not -1", targets[i], i,
             config_.vocab_size);
    num_counted += targets[i] >= 0;
  }
  const bool backward = dloss != 0.0;
  // New shapes reallocate the activations the captured graphs point at.
  if (batch != batch_ || seq != seq_) {
    graphs_.clear();
  }
  resize(batch, seq);
  if (group() != nullptr) {
    // The group's counted targets (the cross-entropy is the group's mean, as on the CPU).
    MF_CUDA_CHECK(cudaMemcpyAsync(scratch_->counted.data(), &num_counted, sizeof(int64_t),
                                  cudaMemcpyHostToDevice, stream_));
    group()->all_reduce_sum(scratch_->counted.data(), 1, CommDType::kInt64);
    MF_CUDA_CHECK(cudaMemcpyAsync(&num_counted, scratch_->counted.data(), sizeof(int64_t),
                                  cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  accumulate_grads_ = grad_mode == GradMode::kAccumulate;
  Scratch& s = *scratch_;

  // Everything the device work reads from the host, into buffers of fixed size and place.
  std::vector<int32_t> positions(static_cast<size_t>(n));
  // Under sequence and tensor parallelism this rank's positions are the rank-th slice of each
  // sequence.
  for (int64_t i = 0; i < n; ++i) {
    positions[static_cast<size_t>(i)] = static_cast<int32_t>(group_rank() * seq + i % seq);
  }
  copy_to_device(s.tokens.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t));
  copy_to_device(s.targets.data(), targets, static_cast<size_t>(n) * sizeof(int32_t));
  copy_to_device(s.positions.data(), positions.data(), positions.size() * sizeof(int32_t));
  if (tp_ != nullptr) {
    // Tensor-parallel attention runs over the group's full sequences [batch, ranks * seq].
    const int64_t full_seq = seq * tp_->size();
    std::vector<int32_t> full(static_cast<size_t>(batch * full_seq));
    for (size_t i = 0; i < full.size(); ++i) {
      full[i] = static_cast<int32_t>(static_cast<int64_t>(i) % full_seq);
    }
    copy_to_device(s.tp_positions.data(), full.data(), full.size() * sizeof(int32_t));
  }
  if (backward) {
    TokenGroups groups = group_tokens(tokens, n);
    pad_token_groups(groups, static_cast<size_t>(n));
    s.group_ids.upload(groups.token_ids);
    s.group_offsets.upload(groups.offsets);
    s.group_positions.upload(groups.positions);
  }
  const double divisor = ce_count > 0.0 ? ce_count : static_cast<double>(num_counted);
  const auto dce = static_cast<float>(divisor > 0.0 ? dloss / divisor : 0.0);
  copy_to_device(s.dce.data(), &dce, sizeof(float));

  const StepKey key{batch, seq, dloss, accumulate_grads_};
  const auto enqueue = [&] { enqueue_forward_backward(key); };
  if (graphs_enabled_ && backward && !timer_.enabled() && host_logits_ == nullptr) {
    MF_CHECK(!grad_ready_hook_ && !weights_needed_hook_,
             "CUDA graphs replay a whole step: they do not run beside gradient sums or an "
             "optimizer update overlapped with it");
    replay_or_capture(key, enqueue);
  } else {
    enqueue();
  }

  double ce_sum = 0.0;
  std::vector<float> router(2 * static_cast<size_t>(num_moe_layers_));
  MF_CUDA_CHECK(
      cudaMemcpyAsync(&ce_sum, s.sums.data(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
  if (!router.empty()) {
    MF_CUDA_CHECK(cudaMemcpyAsync(router.data(), s.router_losses.data(),
                                  router.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  }
  timer_.flush(stream_);
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));

  LossBreakdown out;
  out.num_counted = num_counted;
  out.ce_loss = num_counted > 0 ? ce_sum / static_cast<double>(num_counted) : 0.0;
  moe_stats_.clear();
  int64_t m = 0;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    if (!config_.layer_is_moe(l)) continue;
    MoeFfnStats stats;
    stats.dispatch = expert_dispatch(l);
    stats.aux_loss = router[static_cast<size_t>(2 * m)];
    stats.z_loss = router[static_cast<size_t>(2 * m + 1)];
    const Layer& a = layers_[static_cast<size_t>(l)];
    stats.expert_load.assign(a.host_counts.data(), a.host_counts.data() + config_.num_experts);
    // Routed to this rank's experts (all of them on one rank) and not kept.
    int64_t routed_here = 0;
    for (int64_t e = 0; e < num_local_experts(); ++e) {
      routed_here +=
          a.host_counts[static_cast<size_t>(expert_parallel_rank() * num_local_experts() + e)];
    }
    // Each chunk's row offsets end with its kept rows.
    stats.num_dropped = routed_here;
    for (int64_t c = 0; c < ep_chunks_; ++c) {
      stats.num_dropped -=
          a.host_offsets[static_cast<size_t>((c + 1) * (num_local_experts() + 1) - 1)];
    }
    out.aux_loss += stats.aux_loss / static_cast<double>(num_moe_layers_);
    out.z_loss += stats.z_loss / static_cast<double>(num_moe_layers_);
    moe_stats_.push_back(std::move(stats));
    ++m;
  }
  out.loss = out.ce_loss + config_.router_aux_loss_coef * out.aux_loss +
             config_.router_z_loss_coef * out.z_loss;
  return out;
}

std::vector<float> GpuTransformer::router_logits(int64_t l) const {
  MF_CHECK(l >= 0 && l < config_.num_layers && config_.layer_is_moe(l),
           "layer {} is not an MoE layer of this model", l);
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  const std::vector<float> logits = layers_[static_cast<size_t>(l)].router_logits.download();
  const int64_t num_experts = config_.num_experts;
  MF_CHECK(static_cast<int64_t>(logits.size()) >= n_ * num_experts, "no forward has run yet");
  // The all-to-all dispatch routes this rank's tokens only.
  if (a2a_layer(l)) return {logits.begin(), logits.begin() + n_ * num_experts};
  // This rank's rows: one piece per chunk of the group's order (moe_group_forward; one chunk under
  // tensor parallelism).
  const int64_t piece = n_ / ep_chunks_ * num_experts;
  std::vector<float> out;
  out.reserve(static_cast<size_t>(n_ * num_experts));
  for (int64_t c = 0; c < ep_chunks_; ++c) {
    const auto first = logits.begin() + (c * group_size() + group_rank()) * piece;
    out.insert(out.end(), first, first + piece);
  }
  return out;
}

std::vector<float> GpuTransformer::forward_logits(const int32_t* tokens, const int32_t* targets,
                                                  int64_t batch, int64_t seq, LossBreakdown* loss) {
  std::vector<float> logits(static_cast<size_t>(batch * seq * config_.vocab_size));
  host_logits_ = logits.data();
  try {
    *loss = forward_backward(tokens, targets, batch, seq, 0.0);
  } catch (...) {
    host_logits_ = nullptr;
    throw;
  }
  host_logits_ = nullptr;
  return logits;
}

}  // namespace moeforge::cuda
