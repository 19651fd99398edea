// GpuInference: the layers of GpuTransformer's forward over a KV cache, composed from the kernels
// of src/cuda in the order of model/transformer.cpp's forward_incremental.
#include "cuda/gpu_inference.h"

#include <algorithm>

#include "core/error.h"
#include "cuda/block_sparse_attention.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_attention.h"
#include "cuda/device_info.h"
#include "cuda/embedding.h"
#include "cuda/flex_prefill.h"
#include "cuda/model_support.h"
#include "cuda/moe_dispatch.h"
#include "cuda/reductions.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"
#include "cuda/router.h"
#include "cuda/shared_expert_gate.h"
#include "cuda/swiglu.h"
#include "ops/row_map.h"

namespace moeforge::cuda {

namespace {

constexpr int64_t kUploadChunkFloats = int64_t{1} << 24;  // 64 MiB of fp32 staging
constexpr int64_t kDenseLayoutBlock = 64;                 // block-sparse dense prefill

}  // namespace

// Buffers for the largest chunk of tokens seen, shared by all layers. x and ln hold every token of
// a call; the FFN buffers hold one chunk of at most kFfnChunkTokens tokens.
struct GpuInference::Scratch {
  int64_t max_tokens = 0;
  DeviceBuffer<int32_t> tokens, positions;  // [n]
  DeviceBuffer<float> x;                    // [n, h] residual stream
  DeviceBuffer<bf16> ln;                    // [n, h] normed input of the attention or the FFN
  DeviceBuffer<float> rstd;                 // [n * num_heads] (written by every RMSNorm, unused)
  DeviceBuffer<bf16> qkv;  // [n, q_dim + 2 kv_dim] the packed projection (packed layers)
  DeviceBuffer<bf16> q;    // [n, q_dim] after q/k norm and RoPE
  // Unpacked layers: the q and k projections before q/k norm, and k after it.
  DeviceBuffer<bf16> q_lin, k_lin, k;        // [n, q_dim], [n, kv_dim], [n, kv_dim]
  DeviceBuffer<bf16> att;                    // [n, q_dim]
  DeviceBuffer<float> lse;                   // [num_heads, n]
  DeviceBuffer<float> attention_workspace;   // decode attention's key splits
  DeviceBuffer<float> router_logits, probs;  // [c, E]
  DeviceBuffer<int32_t> expert_idx;          // [c, k]
  DeviceBuffer<float> gates;                 // [c, k]
  DeviceBuffer<int32_t> expert_offsets;      // [E + 1]
  PinnedHostBuffer<int32_t> host_offsets;    // [E + 1]
  DeviceBuffer<int32_t> expert_kept;         // [E] rows kept so far in this forward (capacity only)
  DeviceBuffer<int32_t> assignment_row, row_token;  // [c * k]
  DeviceBuffer<int32_t> row_map;  // the row map's scratch (row_map_scratch_ints(c * k, E))
  // [c * k, h] expert inputs in expert order, then their outputs, then the shared expert's output
  DeviceBuffer<bf16> rows;
  // [c * k, f], [c, ffn] or [c, S] (the shared expert's); h_gate takes the SwiGLU output
  DeviceBuffer<bf16> h_gate, h_up;
  DeviceBuffer<float> shared_score;             // [c] the shared expert gate's scores
  DeviceBuffer<bf16> lnf;                       // [h] final norm of the last position
  DeviceBuffer<float> logits;                   // [vocab]
  PinnedHostBuffer<float> host_logits;          // [vocab]
  DeviceBlockSparseLayoutBuffers dense_layout;  // every causal block of dense_layout_tokens
  int64_t dense_layout_tokens = 0;
  FlexPrefillDeviceSelection selection;
};

// Per-head statistics of a sparse prefill, copied from each layer's selection without a sync.
struct GpuInference::FlexStats {
  PinnedHostBuffer<int32_t> query_aware;  // [num_layers * num_heads]
  PinnedHostBuffer<double> js_distance;
  PinnedHostBuffer<int64_t> num_vertical, num_slash, num_selected;
  std::vector<bool> dense_fallback;  // [num_layers]
  int64_t num_blocks = 0;
};

GpuInference::GpuInference(const ModelConfig& config, const std::vector<float>& params)
    : config_(config),
      layout_(config),
      scratch_(std::make_unique<Scratch>()),
      flex_stats_(std::make_unique<FlexStats>()),
      logits_(static_cast<size_t>(config.vocab_size)) {
  validate_model_config(config_);
  MF_CHECK(config_.head_dim % 8 == 0 && config_.head_dim <= kDecodeAttentionMaxHeadDim,
           "GPU inference needs head_dim a multiple of 8 up to {}, got {}; use --device cpu",
           kDecodeAttentionMaxHeadDim, config_.head_dim);
  MF_CHECK(config_.max_position_embeddings > 0,
           "GPU inference needs max_position_embeddings > 0 (its RoPE table), got {}",
           config_.max_position_embeddings);
  MF_CHECK(static_cast<int64_t>(params.size()) == layout_.num_params(),
           "GpuInference: {} values for a model of {} parameters", params.size(),
           layout_.num_params());
  grouped_experts_ =
      config_.is_moe() &&
      grouped_.available({config_.num_experts, config_.hidden_size, config_.moe_intermediate_size});
  cudnn_prefill_ = config_.head_dim <= 128;
  // A blocking stream, so the synchronous copies of DeviceBuffer (legacy stream) order with it.
  MF_CUDA_CHECK(cudaStreamCreate(&stream_));
  upload_weights(params);
  const RopeTable table =
      make_rope_table(config_.max_position_embeddings, config_.head_dim, config_.rope_theta);
  rope_cos_.upload(table.cos);
  rope_sin_.upload(table.sin);
  cache_k_.resize(static_cast<size_t>(config_.num_layers));
  cache_v_.resize(static_cast<size_t>(config_.num_layers));
  scratch_->logits.resize(static_cast<size_t>(config_.vocab_size));
  scratch_->host_logits.resize(static_cast<size_t>(config_.vocab_size));
  scratch_->lnf.resize(static_cast<size_t>(config_.hidden_size));
  if (config_.is_moe()) {
    scratch_->expert_offsets.resize(static_cast<size_t>(config_.num_experts + 1));
    scratch_->expert_kept.resize(static_cast<size_t>(config_.num_experts));
    scratch_->host_offsets.resize(static_cast<size_t>(config_.num_experts + 1));
  }
}

GpuInference::~GpuInference() {
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
}

void GpuInference::upload_weights(const std::vector<float>& params) {
  // bf16 copy of everything, rounded on the device as GpuTransformer rounds its master weights.
  const int64_t num_params = layout_.num_params();
  params_bf16_.resize(static_cast<size_t>(num_params));
  {
    DeviceBuffer<float> staging(static_cast<size_t>(std::min(num_params, kUploadChunkFloats)));
    for (int64_t begin = 0; begin < num_params; begin += kUploadChunkFloats) {
      const int64_t count = std::min(kUploadChunkFloats, num_params - begin);
      // Synchronous on the legacy stream: waits for the previous chunk's cast.
      copy_to_device(staging.data(), params.data() + begin,
                     static_cast<size_t>(count) * sizeof(float));
      cast_to_bf16(params_bf16_.data() + begin, staging.data(), count, stream_);
    }
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  // fp32 copies of the vectors (norm weights, biases) and of the embedding table, in layout order
  // (so tensors adjacent in the layout stay adjacent, as the packed q/k/v bias needs).
  std::vector<float> packed;
  for (const ParamSpec& spec : layout_.specs()) {
    if (spec.shape.size() != 1 && spec.offset != layout_.embed_tokens()) continue;
    f32_offset_[spec.offset] = static_cast<int64_t>(packed.size());
    packed.insert(packed.end(), params.begin() + spec.offset,
                  params.begin() + spec.offset + spec.numel);
  }
  params_f32_.upload(packed);
}

const float* GpuInference::w(int64_t offset) const {
  if (offset < 0) return nullptr;
  const auto it = f32_offset_.find(offset);
  MF_CHECK(it != f32_offset_.end(), "GpuInference: no fp32 copy of the tensor at offset {}",
           offset);
  return params_f32_.data() + it->second;
}

void GpuInference::set_prefill_attention(const PrefillAttention& attention) {
  check_prefill_attention(attention);
  prefill_attention_ = attention;
}

void GpuInference::start(int64_t capacity) {
  MF_CHECK(capacity >= 1 && capacity <= config_.max_position_embeddings,
           "a KV cache of {} positions is outside [1, max_position_embeddings = {}]", capacity,
           config_.max_position_embeddings);
  length_ = 0;
  kept_positions_ = 0;
  if (capacity <= capacity_) return;
  const auto size = static_cast<size_t>(capacity * config_.kv_dim());
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    cache_k_[static_cast<size_t>(l)].resize(size);
    cache_v_[static_cast<size_t>(l)].resize(size);
  }
  capacity_ = capacity;
}

void GpuInference::reserve(int64_t n) {
  Scratch& s = *scratch_;
  if (n <= s.max_tokens) return;
  const auto h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const auto heads = config_.num_heads;
  const auto size = [](int64_t count) { return static_cast<size_t>(count); };
  s.tokens.resize(size(n));
  s.positions.resize(size(n));
  s.x.resize(size(n * h));
  s.ln.resize(size(n * h));
  s.rstd.resize(size(n * std::max<int64_t>(heads, 1)));
  bool any_packed = false, any_unpacked = false;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    (packed_qkv(config_, layout_.layer(l)) ? any_packed : any_unpacked) = true;
  }
  s.qkv.resize(any_packed ? size(n * (qd + 2 * kvd)) : 0);
  s.q.resize(size(n * qd));
  s.k_lin.resize(any_unpacked ? size(n * kvd) : 0);
  if (config_.qk_norm) {
    s.q_lin.resize(size(n * qd));
    s.k.resize(size(n * kvd));
  }
  s.att.resize(size(n * qd));
  s.lse.resize(size(heads * n));
  const int64_t c = std::min(n, kFfnChunkTokens);
  int64_t ffn_width = 0;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    ffn_width = std::max(ffn_width,
                         config_.layer_is_moe(l)
                             ? std::max(config_.num_experts_per_tok * config_.moe_intermediate_size,
                                        config_.shared_expert_intermediate_size)
                             : config_.intermediate_size);
  }
  s.h_gate.resize(size(c * ffn_width));
  s.h_up.resize(size(c * ffn_width));
  if (config_.is_moe()) {
    const int64_t e = config_.num_experts, k = config_.num_experts_per_tok;
    s.router_logits.resize(size(c * e));
    s.probs.resize(size(c * e));
    s.expert_idx.resize(size(c * k));
    s.gates.resize(size(c * k));
    s.assignment_row.resize(size(c * k));
    s.row_token.resize(size(c * k));
    s.row_map.resize(size(row_map_scratch_ints(c * k, e)));
    s.rows.resize(size(c * k * h));
    s.shared_score.resize(size(config_.shared_expert_intermediate_size > 0 ? c : 0));
  }
  s.max_tokens = n;
}

void GpuInference::qkv_forward(int64_t l, int64_t n) {
  const LayerOffsets& o = layout_.layer(l);
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const int64_t d = config_.head_dim;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  bf16* new_k = cache_k(l) + length_ * kvd;
  bf16* new_v = cache_v(l) + length_ * kvd;
  if (packed_qkv(config_, o)) {
    // One GEMM into packed rows [q | k | v], then RoPE into q and the cache, and a copy of v.
    const int64_t width = qd + 2 * kvd;
    bf16* qkv = s.qkv.data();
    blas_.linear_forward(qkv, OutType::kBf16, s.ln.data(), wb(o.q_proj), w(o.q_bias), n, h, width,
                         false, stream_);
    rope_forward_strided(s.q.data(), qd, qkv, width, s.positions.data(), rope_cos_.data(),
                         rope_sin_.data(), n, config_.num_heads, d, stream_);
    rope_forward_strided(new_k, kvd, qkv + qd, width, s.positions.data(), rope_cos_.data(),
                         rope_sin_.data(), n, config_.num_kv_heads, d, stream_);
    copy_rows_async(new_v, kvd, qkv + qd + kvd, width, n, kvd, stream_);
    return;
  }
  bf16* q_pre = config_.qk_norm ? s.q_lin.data() : s.q.data();
  blas_.linear_forward(q_pre, OutType::kBf16, s.ln.data(), wb(o.q_proj), w(o.q_bias), n, h, qd,
                       false, stream_);
  blas_.linear_forward(s.k_lin.data(), OutType::kBf16, s.ln.data(), wb(o.k_proj), w(o.k_bias), n, h,
                       kvd, false, stream_);
  blas_.linear_forward(new_v, OutType::kBf16, s.ln.data(), wb(o.v_proj), w(o.v_bias), n, h, kvd,
                       false, stream_);
  const bf16* k_pre = s.k_lin.data();
  if (config_.qk_norm) {
    rmsnorm_forward(s.q.data(), s.rstd.data(), s.q_lin.data(), w(o.q_norm), n * config_.num_heads,
                    d, eps, stream_);
    rmsnorm_forward(s.k.data(), s.rstd.data(), s.k_lin.data(), w(o.k_norm),
                    n * config_.num_kv_heads, d, eps, stream_);
    k_pre = s.k.data();
  }
  rope_forward(s.q.data(), s.q.data(), s.positions.data(), rope_cos_.data(), rope_sin_.data(), n,
               config_.num_heads, d, stream_);
  rope_forward(new_k, k_pre, s.positions.data(), rope_cos_.data(), rope_sin_.data(), n,
               config_.num_kv_heads, d, stream_);
}

void GpuInference::attention_forward(int64_t l, int64_t n, bool sparse) {
  Scratch& s = *scratch_;
  const int64_t heads = config_.num_heads, kv_heads = config_.num_kv_heads;
  const int64_t d = config_.head_dim;
  const bf16* k = cache_k(l);
  const bf16* v = cache_v(l);
  const ops::SparseAttentionDims dims{n, heads, kv_heads, d};
  if (sparse) {
    FlexPrefillDeviceSelection& sel = s.selection;
    flex_prefill_select(sel, s.q.data(), k, dims, prefill_attention_.params, stream_);
    const DeviceBlockSparseLayout view{sel.row_offsets.data(), sel.col_idx.data(), sel.num_heads,
                                       sel.num_blocks, sel.block_size};
    block_sparse_attention_forward(s.att.data(), s.lse.data(), s.q.data(), k, v, view, dims,
                                   stream_);
    FlexStats& f = *flex_stats_;
    f.dense_fallback[static_cast<size_t>(l)] = sel.dense_fallback;
    f.num_blocks = sel.num_blocks;
    const auto copy = [&](auto* dst, const auto& src) {
      MF_CUDA_CHECK(cudaMemcpyAsync(dst + l * heads, src.data(), src.bytes(),
                                    cudaMemcpyDeviceToHost, stream_));
    };
    copy(f.query_aware.data(), sel.query_aware);
    copy(f.js_distance.data(), sel.js_distance);
    copy(f.num_vertical.data(), sel.num_vertical_blocks);
    copy(f.num_slash.data(), sel.num_slash_blocks);
    copy(f.num_selected.data(), sel.num_selected_blocks);
  } else if (length_ == 0 && n > 1 && cudnn_prefill_) {
    attention_.forward(s.att.data(), s.lse.data(), s.q.data(), k, v,
                       AttentionShape{1, n, heads, kv_heads, d}, stream_);
  } else if (length_ == 0 && n > 1) {
    block_sparse_attention_forward(s.att.data(), s.lse.data(), s.q.data(), k, v,
                                   s.dense_layout.view(), dims, stream_);
  } else {
    decode_attention_forward(s.att.data(), s.q.data(), k, v,
                             DecodeAttentionDims{n, length_, heads, kv_heads, d},
                             s.attention_workspace, stream_);
  }
}

void GpuInference::expert_forward(bf16* y, const bf16* x, const bf16* w, int64_t in, int64_t out) {
  Scratch& s = *scratch_;
  if (grouped_experts_) {
    grouped_.forward(y, x, w, s.expert_offsets.data(), {config_.num_experts, in, out}, stream_);
    return;
  }
  for (int64_t e = 0; e < config_.num_experts; ++e) {
    const int64_t begin = s.host_offsets[static_cast<size_t>(e)];
    const int64_t count = s.host_offsets[static_cast<size_t>(e) + 1] - begin;
    if (count == 0) continue;
    blas_.linear_forward(y + begin * out, OutType::kBf16, x + begin * in, w + e * out * in, nullptr,
                         count, in, out, false, stream_);
  }
}

void GpuInference::moe_forward(int64_t l, float* x, const bf16* ln, int64_t n, int64_t capacity) {
  const LayerOffsets& o = layout_.layer(l);
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, f = config_.moe_intermediate_size;
  const int64_t num_experts = config_.num_experts, k = config_.num_experts_per_tok;
  blas_.linear_forward(s.router_logits.data(), OutType::kFloat, ln, wb(o.router), nullptr, n, h,
                       num_experts, false, stream_);
  router_forward(s.probs.data(), s.expert_idx.data(), s.gates.data(), s.router_logits.data(),
                 RouterShape{n, num_experts, k, config_.norm_topk_prob}, stream_);
  build_row_map(s.expert_offsets.data(), s.assignment_row.data(), s.row_token.data(),
                s.row_map.data(), s.expert_idx.data(), n, k, num_experts, capacity, stream_,
                s.expert_kept.data());
  scatter_rows(s.rows.data(), ln, s.row_token.data(), n * k, h, stream_);
  if (!grouped_experts_) {
    // Per-expert cuBLASLt calls need the row ranges on the host.
    MF_CUDA_CHECK(cudaMemcpyAsync(s.host_offsets.data(), s.expert_offsets.data(),
                                  s.host_offsets.bytes(), cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  expert_forward(s.h_gate.data(), s.rows.data(), wb(o.experts_gate), h, f);
  expert_forward(s.h_up.data(), s.rows.data(), wb(o.experts_up), h, f);
  swiglu_forward(s.h_gate.data(), s.h_gate.data(), s.h_up.data(), n * k * f, stream_);
  // The expert inputs are dead: rows takes the expert outputs.
  expert_forward(s.rows.data(), s.h_gate.data(), wb(o.experts_down), f, h);
  combine_rows(x, x, s.rows.data(), s.gates.data(), s.assignment_row.data(), n, k, h, stream_);
  if (config_.shared_expert_intermediate_size > 0) shared_expert_forward(l, x, ln, n);
}

void GpuInference::shared_expert_forward(int64_t l, float* x, const bf16* ln, int64_t n) {
  const LayerOffsets& o = layout_.layer(l);
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, shared = config_.shared_expert_intermediate_size;
  blas_.linear_forward(s.h_gate.data(), OutType::kBf16, ln, wb(o.shared_gate), nullptr, n, h,
                       shared, false, stream_);
  blas_.linear_forward(s.h_up.data(), OutType::kBf16, ln, wb(o.shared_up), nullptr, n, h, shared,
                       false, stream_);
  swiglu_forward(s.h_gate.data(), s.h_gate.data(), s.h_up.data(), n * shared, stream_);
  // The routed experts' outputs are in x: rows takes the shared expert's output.
  blas_.linear_forward(s.rows.data(), OutType::kBf16, s.h_gate.data(), wb(o.shared_down), nullptr,
                       n, shared, h, false, stream_);
  shared_expert_gate_forward(x, s.shared_score.data(), ln, wb(o.shared_expert_gate), s.rows.data(),
                             n, h, stream_);
}

void GpuInference::dense_ffn_forward(int64_t l, float* x, const bf16* ln, int64_t n) {
  const LayerOffsets& o = layout_.layer(l);
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, ffn = config_.intermediate_size;
  blas_.linear_forward(s.h_gate.data(), OutType::kBf16, ln, wb(o.mlp_gate), nullptr, n, h, ffn,
                       false, stream_);
  blas_.linear_forward(s.h_up.data(), OutType::kBf16, ln, wb(o.mlp_up), nullptr, n, h, ffn, false,
                       stream_);
  swiglu_forward(s.h_gate.data(), s.h_gate.data(), s.h_up.data(), n * ffn, stream_);
  blas_.linear_forward(x, OutType::kFloat, s.h_gate.data(), wb(o.mlp_down), nullptr, n, ffn, h,
                       true, stream_);
}

void GpuInference::run(const int32_t* tokens, int64_t n) {
  MF_CHECK(n > 0, "GPU inference needs at least one token");
  MF_CHECK(capacity_ > 0, "GpuInference: prefill before start()");
  MF_CHECK(length_ + n <= capacity_,
           "KV cache full: {} cached + {} new positions exceed its capacity {}", length_, n,
           capacity_);
  for (int64_t i = 0; i < n; ++i) {
    MF_CHECK(tokens[i] >= 0 && tokens[i] < config_.vocab_size,
             "token {} is outside the vocabulary [0, {})", tokens[i], config_.vocab_size);
  }
  reserve(n);
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  const bool sparse = prefill_attention_.flex && length_ == 0 && n > 1;  // prefill_attention.h
  if (sparse) {
    const auto count = static_cast<size_t>(config_.num_layers * config_.num_heads);
    FlexStats& f = *flex_stats_;
    f.query_aware.resize(count);
    f.js_distance.resize(count);
    f.num_vertical.resize(count);
    f.num_slash.resize(count);
    f.num_selected.resize(count);
    f.dense_fallback.assign(static_cast<size_t>(config_.num_layers), false);
  } else if (length_ == 0 && n > 1 && !cudnn_prefill_ && s.dense_layout_tokens != n) {
    s.dense_layout =
        upload_layout(ops::dense_causal_layout(config_.num_heads, n, kDenseLayoutBlock));
    s.dense_layout_tokens = n;
  }
  std::vector<int32_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    positions[static_cast<size_t>(i)] = static_cast<int32_t>(length_ + i);
  copy_to_device(s.tokens.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t));
  copy_to_device(s.positions.data(), positions.data(), positions.size() * sizeof(int32_t));
  embedding_forward(s.x.data(), s.tokens.data(), w(layout_.embed_tokens()), n, h, stream_);

  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerOffsets& o = layout_.layer(l);
    rmsnorm_forward(s.ln.data(), s.rstd.data(), s.x.data(), w(o.input_norm), n, h, eps, stream_);
    qkv_forward(l, n);
    if (l == kept_layer_ && length_ == 0) {
      kept_queries_.resize(static_cast<size_t>(n * config_.q_dim()));
      MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
      copy_to_host(kept_queries_.data(), s.q.data(), kept_queries_.size() * sizeof(bf16));
      kept_positions_ = n;
    }
    attention_forward(l, n, sparse);
    // x += att W_o^T: the GEMM accumulates onto the residual stream.
    blas_.linear_forward(s.x.data(), OutType::kFloat, s.att.data(), wb(o.o_proj), nullptr, n,
                         config_.q_dim(), h, true, stream_);
    rmsnorm_forward(s.ln.data(), s.rstd.data(), s.x.data(), w(o.post_attention_norm), n, h, eps,
                    stream_);
    // A capacity factor applies to all n tokens of the call, the earliest first (the CPU
    // reference's rule: a prefill can drop, a one-token decode step cannot): the chunks carry
    // each expert's kept rows.
    const int64_t capacity =
        config_.layer_is_moe(l)
            ? ops::expert_capacity(config_.capacity_factor, n, config_.num_experts_per_tok,
                                   config_.num_experts)
            : -1;
    if (capacity >= 0) s.expert_kept.fill_zero(stream_);
    for (int64_t begin = 0; begin < n; begin += kFfnChunkTokens) {
      const int64_t count = std::min(kFfnChunkTokens, n - begin);
      float* x = s.x.data() + begin * h;
      const bf16* ln = s.ln.data() + begin * h;
      if (config_.layer_is_moe(l)) {
        moe_forward(l, x, ln, count, capacity);
      } else {
        dense_ffn_forward(l, x, ln, count);
      }
    }
  }
  // The final norm and the LM head of the last position only.
  rmsnorm_forward(s.lnf.data(), s.rstd.data(), s.x.data() + (n - 1) * h, w(layout_.final_norm()), 1,
                  h, eps, stream_);
  blas_.linear_forward(s.logits.data(), OutType::kFloat, s.lnf.data(), wb(layout_.lm_head()),
                       nullptr, 1, h, config_.vocab_size, false, stream_);
  MF_CUDA_CHECK(cudaMemcpyAsync(s.host_logits.data(), s.logits.data(), s.logits.bytes(),
                                cudaMemcpyDeviceToHost, stream_));
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::copy(s.host_logits.data(), s.host_logits.data() + config_.vocab_size, logits_.begin());
  length_ += n;

  if (!sparse) return;
  const FlexStats& f = *flex_stats_;
  const double num_causal = static_cast<double>(f.num_blocks * (f.num_blocks + 1) / 2);
  prefill_stats_.assign(static_cast<size_t>(config_.num_layers), {});
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    PrefillLayerStats& stats = prefill_stats_[static_cast<size_t>(l)];
    stats.dense_fallback = f.dense_fallback[static_cast<size_t>(l)];
    stats.head_stats.resize(static_cast<size_t>(config_.num_heads));
    for (int64_t head = 0; head < config_.num_heads; ++head) {
      const auto i = static_cast<size_t>(l * config_.num_heads + head);
      ops::FlexPrefillHeadStats& hs = stats.head_stats[static_cast<size_t>(head)];
      hs.query_aware = f.query_aware[i] != 0;
      hs.js_distance = f.js_distance[i];
      hs.num_vertical_blocks = f.num_vertical[i];
      hs.num_slash_blocks = f.num_slash[i];
      hs.num_selected_blocks = f.num_selected[i];
      hs.density = static_cast<double>(f.num_selected[i]) / num_causal;
    }
  }
}

const std::vector<float>& GpuInference::prefill(const int32_t* tokens, int64_t num_tokens) {
  run(tokens, num_tokens);
  return logits_;
}

const std::vector<float>& GpuInference::decode(int32_t token) {
  run(&token, 1);
  return logits_;
}

std::vector<float> GpuInference::download_cache(int64_t l, bool keys) const {
  MF_CHECK(l >= 0 && l < config_.num_layers, "layer {} is outside [0, {})", l, config_.num_layers);
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<bf16> host(static_cast<size_t>(length_ * config_.kv_dim()));
  const DeviceBuffer<bf16>& cache = (keys ? cache_k_ : cache_v_)[static_cast<size_t>(l)];
  if (!host.empty()) copy_to_host(host.data(), cache.data(), host.size() * sizeof(bf16));
  return to_float(host);
}

void GpuInference::keep_prefill_qkv(int64_t layer) {
  MF_CHECK(layer >= 0 && layer < config_.num_layers, "layer {} is outside the model's {} layers",
           layer, config_.num_layers);
  kept_layer_ = layer;
  kept_positions_ = 0;
}

PrefillQkv GpuInference::prefill_qkv(int64_t layer) const {
  MF_CHECK(layer == kept_layer_ && kept_positions_ > 0,
           "GpuInference: layer {}'s queries were not kept (keep_prefill_qkv before the prefill)",
           layer);
  MF_CHECK(kept_positions_ == length_,
           "GpuInference: the cache holds {} positions, not just the {} of the kept prefill",
           length_, kept_positions_);
  return PrefillQkv{layer,
                    length_,
                    config_.num_heads,
                    config_.num_kv_heads,
                    config_.head_dim,
                    to_float(kept_queries_),
                    download_cache(layer, true),
                    download_cache(layer, false)};
}

}  // namespace moeforge::cuda
