// Forward and backward of the whole decoder, composed from the reference ops (see transformer.h).
#include "model/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "core/error.h"
#include "ops/attention.h"
#include "ops/block_sparse_attention.h"
#include "ops/cross_entropy.h"
#include "ops/elementwise.h"
#include "ops/embedding.h"
#include "ops/linear.h"
#include "ops/rmsnorm.h"
#include "ops/rope.h"

namespace moeforge {

namespace {

// ptr + offset, or null for a tensor the model does not have.
template <typename P>
P* offset_or_null(P* ptr, int64_t offset) {
  return ptr == nullptr ? nullptr : ptr + offset;
}

// Tensor parallel: where this rank's slices of an MoE layer's expert weights sit, viewing the
// gate / up stacks [experts, ffn, hidden] as [experts, ffn * hidden] (its rows of each expert) and
// the down stack [experts, hidden, ffn] as [experts * hidden, ffn] (its columns), and their
// offsets in the packed buffer: gate, up, down, shared down. expert and shared: the rank's slices
// of one expert's down projection [hidden, moe_intermediate_size] and of the shared expert's.
struct MoeSlices {
  ColumnSlice gate_up, down, shared_down;
  int64_t up_at, down_at, shared_down_at, size;
};

MoeSlices moe_slices(const ModelConfig& c, const ColumnSlice& expert, const ColumnSlice& shared) {
  MoeSlices s;
  s.gate_up = {c.num_experts, expert.cols * expert.rows, expert.begin * expert.rows,
               expert.width * expert.rows};
  s.down = {c.num_experts * expert.rows, expert.cols, expert.begin, expert.width};
  s.shared_down = shared;
  const int64_t block = c.num_experts * expert.width * expert.rows;
  s.up_at = block;
  s.down_at = 2 * block;
  s.shared_down_at = 3 * block;
  s.size = 3 * block + shared.rows * shared.width;
  return s;
}

}  // namespace

template <typename T>
KvCache<T>::KvCache(const ModelConfig& config, int64_t cap) : capacity(cap) {
  MF_CHECK(cap > 0, "KV cache capacity must be positive, got {}", cap);
  k.assign(static_cast<size_t>(config.num_layers), std::vector<T>(cap * config.kv_dim()));
  v.assign(static_cast<size_t>(config.num_layers), std::vector<T>(cap * config.kv_dim()));
}

namespace {

// The experts a rank of ep holds: its shard under sequence/expert parallelism; all of them under
// tensor parallelism (every rank runs every expert on its slice of the columns) or on one rank.
ExpertShard held_experts(const ModelConfig& c, const Communicator& ep, ParallelLayout layout) {
  if (layout == ParallelLayout::kTensor || !c.is_moe() || ep.size() == 1) return {};
  MF_CHECK(c.num_experts % ep.size() == 0,
           "num_experts ({}) must be divisible by the expert-parallel size ({})", c.num_experts,
           ep.size());
  return {ep.rank(), ep.size()};
}

}  // namespace

template <typename T>
Transformer<T>::Transformer(const ModelConfig& config, Communicator& ep, EpDispatchPlan ep_dispatch,
                            ParallelLayout parallel_layout)
    : config_(config),
      layout_(config, held_experts(config, ep, parallel_layout)),
      ep_(ep),
      ep_dispatch_(std::move(ep_dispatch)),
      parallel_layout_(parallel_layout) {
  validate_model_config(config_);
  MF_CHECK(
      ep_dispatch_.size() == 1 || static_cast<int64_t>(ep_dispatch_.size()) == config_.num_layers,
      "an expert dispatch plan of {} entries for a model of {} decoder layers (one for every "
      "layer, or one per layer)",
      ep_dispatch_.size(), config_.num_layers);
  for (int64_t l = 0; l < config_.num_layers; ++l) num_moe_layers_ += config_.layer_is_moe(l);
  const int64_t num_ranks = ep_.size();
  if (parallel_layout_ == ParallelLayout::kTensor) {
    MF_CHECK(config_.num_heads % num_ranks == 0 && config_.num_kv_heads % num_ranks == 0,
             "tensor parallelism over {} ranks needs num_heads ({}) and num_kv_heads ({}) "
             "divisible by the group size",
             num_ranks, config_.num_heads, config_.num_kv_heads);
    if (num_moe_layers_ < config_.num_layers) {
      MF_CHECK(config_.intermediate_size % num_ranks == 0,
               "tensor parallelism over {} ranks needs intermediate_size ({}) divisible by the "
               "group size",
               num_ranks, config_.intermediate_size);
    }
    if (num_moe_layers_ > 0) {
      MF_CHECK(config_.moe_intermediate_size % num_ranks == 0 &&
                   config_.shared_expert_intermediate_size % num_ranks == 0,
               "tensor parallelism over {} ranks needs moe_intermediate_size ({}) and "
               "shared_expert_intermediate_size ({}) divisible by the group size",
               num_ranks, config_.moe_intermediate_size, config_.shared_expert_intermediate_size);
    }
  } else {
    MF_CHECK(config_.num_heads % num_ranks == 0 && config_.num_kv_heads % num_ranks == 0,
             "sequence parallelism over {} ranks needs num_heads ({}) and num_kv_heads ({}) "
             "divisible by the group size",
             num_ranks, config_.num_heads, config_.num_kv_heads);
  }
  params_.assign(static_cast<size_t>(layout_.num_params()), T(0));
  grads_.assign(static_cast<size_t>(layout_.num_params()), T(0));
}

template <typename T>
void Transformer<T>::init_random(uint64_t seed, double std) {
  init_random_params(layout_, seed, std, params_.data());
}

template <typename T>
void Transformer<T>::zero_grads() {
  std::fill(grads_.begin(), grads_.end(), T(0));
}

template <typename T>
void Transformer<T>::resize_activations(int64_t batch, int64_t seq) {
  if (batch == batch_ && seq == seq_ && !acts_.empty()) return;
  batch_ = batch;
  seq_ = seq;
  const int64_t n = batch * seq;
  const int64_t h = config_.hidden_size;
  acts_.resize(static_cast<size_t>(config_.num_layers));
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    LayerActivations& a = acts_[static_cast<size_t>(l)];
    a.residual_in.resize(n * h);
    a.ln1.resize(n * h);
    a.rstd1.resize(n);
    a.q_lin.resize(n * config_.q_dim());
    a.k_lin.resize(n * config_.kv_dim());
    if (config_.qk_norm) {
      a.rstd_q.resize(n * config_.num_heads);
      a.rstd_k.resize(n * config_.num_kv_heads);
    }
    a.q.resize(n * config_.q_dim());
    a.k.resize(n * config_.kv_dim());
    a.v.resize(n * config_.kv_dim());
    a.att.resize(n * config_.q_dim());
    a.residual_mid.resize(n * h);
    a.ln2.resize(n * h);
    a.rstd2.resize(n);
  }
  x_.resize(n * h);
  lnf_.resize(n * h);
  rstdf_.resize(n);
  logits_.resize(n * config_.vocab_size);
  losses_.resize(n);
  tokens_.resize(n);
  targets_.resize(n);
  positions_.resize(n);
  group_positions_.resize(tensor_parallel() ? n * ep_.size() : 0);
}

template <typename T>
typename Transformer<T>::AttentionShard Transformer<T>::attention_shard(int64_t batch,
                                                                        int64_t seq) const {
  if (!tensor_parallel()) {
    return {batch * seq, seq, config_.num_heads, config_.num_kv_heads, 0, 0};
  }
  const int64_t num_ranks = ep_.size();
  const int64_t num_heads = config_.num_heads / num_ranks;
  const int64_t num_kv_heads = config_.num_kv_heads / num_ranks;
  return {batch * num_ranks * seq,
          num_ranks * seq,
          num_heads,
          num_kv_heads,
          ep_.rank() * num_heads * config_.head_dim,
          ep_.rank() * num_kv_heads * config_.head_dim};
}

template <typename T>
ColumnSlice Transformer<T>::ffn_slice(int64_t ffn) const {
  const int64_t width = ffn / ep_.size();
  return ColumnSlice{config_.hidden_size, ffn, ep_.rank() * width, width};
}

template <typename T>
MoeFfnDims Transformer<T>::moe_dims(int64_t n, int64_t l) const {
  return MoeFfnDims{n,
                    config_.hidden_size,
                    config_.moe_intermediate_size,
                    config_.num_experts,
                    config_.num_experts_per_tok,
                    config_.norm_topk_prob,
                    config_.capacity_factor,
                    config_.shared_expert_intermediate_size,
                    config_.router_balance_groups,
                    ep_dispatch_.layer(l),
                    tensor_parallel() ? ParallelLayout::kTensor : ParallelLayout::kSequenceExpert};
}

template <typename T>
MoeFfnWeights<T> Transformer<T>::moe_weights(const LayerOffsets& o) {
  if (!tensor_parallel()) {
    return MoeFfnWeights<T>{p(o.router),       p(o.experts_gate),      p(o.experts_up),
                            p(o.experts_down), p(o.shared_gate),       p(o.shared_up),
                            p(o.shared_down),  p(o.shared_expert_gate)};
  }
  const ColumnSlice shared = ffn_slice(config_.shared_expert_intermediate_size);
  const MoeSlices s = moe_slices(config_, ffn_slice(config_.moe_intermediate_size), shared);
  slice_weights_.resize(static_cast<size_t>(s.size));
  T* w = slice_weights_.data();
  pack_columns(w, p(o.experts_gate), s.gate_up);
  pack_columns(w + s.up_at, p(o.experts_up), s.gate_up);
  pack_columns(w + s.down_at, p(o.experts_down), s.down);
  const bool has_shared = o.shared_down >= 0;
  if (has_shared) pack_columns(w + s.shared_down_at, p(o.shared_down), s.shared_down);
  const int64_t shared_rows = shared.begin * config_.hidden_size;
  return MoeFfnWeights<T>{p(o.router),
                          w,
                          w + s.up_at,
                          w + s.down_at,
                          offset_or_null(p(o.shared_gate), shared_rows),
                          offset_or_null(p(o.shared_up), shared_rows),
                          has_shared ? w + s.shared_down_at : nullptr,
                          p(o.shared_expert_gate)};
}

template <typename T>
MoeFfnGrads<T> Transformer<T>::moe_grads(const LayerOffsets& o) {
  if (!tensor_parallel()) {
    return MoeFfnGrads<T>{g(o.router),       g(o.experts_gate),      g(o.experts_up),
                          g(o.experts_down), g(o.shared_gate),       g(o.shared_up),
                          g(o.shared_down),  g(o.shared_expert_gate)};
  }
  const ColumnSlice shared = ffn_slice(config_.shared_expert_intermediate_size);
  const MoeSlices s = moe_slices(config_, ffn_slice(config_.moe_intermediate_size), shared);
  slice_grads_.assign(static_cast<size_t>(s.size), T(0));
  T* dw = slice_grads_.data();
  const int64_t shared_rows = shared.begin * config_.hidden_size;
  return MoeFfnGrads<T>{g(o.router),
                        dw,
                        dw + s.up_at,
                        dw + s.down_at,
                        offset_or_null(g(o.shared_gate), shared_rows),
                        offset_or_null(g(o.shared_up), shared_rows),
                        o.shared_down >= 0 ? dw + s.shared_down_at : nullptr,
                        g(o.shared_expert_gate)};
}

template <typename T>
void Transformer<T>::add_moe_slice_grads(const LayerOffsets& o) {
  const MoeSlices s = moe_slices(config_, ffn_slice(config_.moe_intermediate_size),
                                 ffn_slice(config_.shared_expert_intermediate_size));
  const T* dw = slice_grads_.data();
  add_packed_columns(g(o.experts_gate), dw, s.gate_up);
  add_packed_columns(g(o.experts_up), dw + s.up_at, s.gate_up);
  add_packed_columns(g(o.experts_down), dw + s.down_at, s.down);
  if (o.shared_down >= 0)
    add_packed_columns(g(o.shared_down), dw + s.shared_down_at, s.shared_down);
}

template <typename T>
void Transformer<T>::exchange_heads(const std::vector<HeadShard>& shards, bool to_heads,
                                    int64_t batch, int64_t seq) {
  const int64_t num_ranks = ep_.size();
  const int64_t d = config_.head_dim;
  int64_t chunk = 0;  // elements exchanged with each rank
  for (const HeadShard& s : shards) chunk += batch * seq * (s.num_heads / num_ranks) * d;
  send_.resize(static_cast<size_t>(chunk * num_ranks));
  recv_.resize(send_.size());
  // Chunk r of a wire buffer holds, per tensor, [batch, seq, heads / n, dim]: the heads of rank r
  // at this rank's positions (to_heads: send) or this rank's heads at rank r's positions.
  auto for_each_run = [&](auto&& copy) {
    for (int64_t r = 0; r < num_ranks; ++r) {
      int64_t offset = r * chunk;
      for (const HeadShard& s : shards) {
        const int64_t local_heads = s.num_heads / num_ranks;
        const int64_t run = local_heads * d;
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t t = 0; t < seq; ++t) {
            T* local = s.local + ((b * seq + t) * s.num_heads + r * local_heads) * d;
            T* heads = s.heads + (b * num_ranks * seq + r * seq + t) * run;
            copy(offset, local, heads, run);
            offset += run;
          }
        }
      }
    }
  };
  if (to_heads) {
    for_each_run([&](int64_t at, T* local, T*, int64_t run) {
      std::copy(local, local + run, send_.begin() + at);
    });
    ep_.all_to_all(send_.data(), recv_.data(), static_cast<size_t>(chunk));
    for_each_run([&](int64_t at, T*, T* heads, int64_t run) {
      std::copy(recv_.begin() + at, recv_.begin() + at + run, heads);
    });
  } else {
    for_each_run([&](int64_t at, T*, T* heads, int64_t run) {
      std::copy(heads, heads + run, send_.begin() + at);
    });
    ep_.all_to_all(send_.data(), recv_.data(), static_cast<size_t>(chunk));
    for_each_run([&](int64_t at, T* local, T*, int64_t run) {
      std::copy(recv_.begin() + at, recv_.begin() + at + run, local);
    });
  }
}

template <typename T>
void Transformer<T>::attention_forward(int64_t l, int64_t batch, int64_t seq, KvCache<T>* cache) {
  const LayerOffsets& o = layout_.layer(l);
  LayerActivations& a = acts_[static_cast<size_t>(l)];
  const int64_t n = batch * seq;
  const int64_t h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const int64_t d = config_.head_dim;
  const bool tp = tensor_parallel();
  // Tensor parallel: this rank's heads (column-parallel rows of q/k/v_proj) over the full
  // sequences; otherwise all heads over the given tokens.
  const AttentionShard s = attention_shard(batch, seq);
  const int64_t q_cols = s.num_heads * d, kv_cols = s.num_kv_heads * d;

  ops::rmsnorm_forward(a.ln1.data(), a.rstd1.data(), a.residual_in.data(), p(o.input_norm), n, h,
                       config_.rms_norm_eps);
  const T* x = a.ln1.data();  // [s.rows, h]
  if (tp) {
    a.ln1_group.resize(static_cast<size_t>(s.rows * h));
    all_gather_sequences(a.ln1_group.data(), a.ln1.data(), batch, seq, h, ep_, group_scratch_);
    x = a.ln1_group.data();
  }
  ops::linear_forward(a.q_lin.data(), x, p(o.q_proj) + s.q_begin * h,
                      offset_or_null(p(o.q_bias), s.q_begin), s.rows, h, q_cols);
  ops::linear_forward(a.k_lin.data(), x, p(o.k_proj) + s.kv_begin * h,
                      offset_or_null(p(o.k_bias), s.kv_begin), s.rows, h, kv_cols);
  ops::linear_forward(a.v.data(), x, p(o.v_proj) + s.kv_begin * h,
                      offset_or_null(p(o.v_bias), s.kv_begin), s.rows, h, kv_cols);
  const T* q_pre = a.q_lin.data();
  const T* k_pre = a.k_lin.data();
  if (config_.qk_norm) {
    ops::rmsnorm_forward(a.q.data(), a.rstd_q.data(), a.q_lin.data(), p(o.q_norm),
                         s.rows * s.num_heads, d, config_.rms_norm_eps);
    ops::rmsnorm_forward(a.k.data(), a.rstd_k.data(), a.k_lin.data(), p(o.k_norm),
                         s.rows * s.num_kv_heads, d, config_.rms_norm_eps);
    q_pre = a.q.data();
    k_pre = a.k.data();
  }
  const int32_t* positions = tp ? group_positions_.data() : positions_.data();
  ops::rope_forward(a.q.data(), q_pre, positions, s.rows, s.num_heads, d, config_.rope_theta);
  ops::rope_forward(a.k.data(), k_pre, positions, s.rows, s.num_kv_heads, d, config_.rope_theta);

  ops::AttentionDims dims{batch, seq, seq, config_.num_heads, config_.num_kv_heads, d};
  const T* keys = a.k.data();
  const T* values = a.v.data();
  T* probs = a.probs.data();
  const bool sparse = cache != nullptr && sparse_prefill_;  // see prefill_attention.h
  if (cache != nullptr) {
    MF_CHECK(batch == 1, "incremental decoding runs one sequence at a time, got batch {}", batch);
    MF_CHECK(cache->length + seq <= cache->capacity,
             "KV cache full: {} cached + {} new positions exceed its capacity {}", cache->length,
             seq, cache->capacity);
    std::vector<T>& ck = cache->k[static_cast<size_t>(l)];
    std::vector<T>& cv = cache->v[static_cast<size_t>(l)];
    std::copy(a.k.begin(), a.k.begin() + n * kvd, ck.begin() + cache->length * kvd);
    std::copy(a.v.begin(), a.v.begin() + n * kvd, cv.begin() + cache->length * kvd);
    dims.num_k = cache->length + seq;
    keys = ck.data();
    values = cv.data();
    probs = nullptr;
    if (sparse) sparse_prefill_attention(l);
  } else if (tp) {
    // This rank's heads over the group's full sequences, as projected.
    dims = ops::AttentionDims{batch, s.seq, s.seq, s.num_heads, s.num_kv_heads, d};
    a.probs.resize(static_cast<size_t>(batch * s.num_heads * s.seq * s.seq));
    ops::attention_forward(a.att.data(), a.probs.data(), a.q.data(), a.k.data(), a.v.data(), dims);
  } else if (ep_.size() > 1) {
    // Sequence -> heads: this rank's heads over the group's full sequences.
    const int64_t num_ranks = ep_.size();
    const int64_t full_seq = num_ranks * seq;
    dims = ops::AttentionDims{
        batch, full_seq, full_seq, config_.num_heads / num_ranks, config_.num_kv_heads / num_ranks,
        d};
    a.q_heads.resize(n * qd);
    a.k_heads.resize(n * kvd);
    a.v_heads.resize(n * kvd);
    a.att_heads.resize(n * qd);
    exchange_heads({{a.q.data(), a.q_heads.data(), config_.num_heads},
                    {a.k.data(), a.k_heads.data(), config_.num_kv_heads},
                    {a.v.data(), a.v_heads.data(), config_.num_kv_heads}},
                   true, batch, seq);
    a.probs.resize(batch * dims.num_q_heads * full_seq * full_seq);
    ops::attention_forward(a.att_heads.data(), a.probs.data(), a.q_heads.data(), a.k_heads.data(),
                           a.v_heads.data(), dims);
    exchange_heads({{a.att.data(), a.att_heads.data(), config_.num_heads}}, false, batch, seq);
  } else {
    a.probs.resize(batch * config_.num_heads * seq * seq);
    probs = a.probs.data();
  }
  if (ep_.size() == 1 && !sparse) {
    ops::attention_forward(a.att.data(), probs, a.q.data(), keys, values, dims);
  }

  if (tp) {
    // Row-parallel o_proj (this rank's heads' columns), the partial sums reduce-scattered.
    const ColumnSlice o_slice{h, qd, s.q_begin, q_cols};
    slice_weights_.resize(static_cast<size_t>(h * q_cols));
    pack_columns(slice_weights_.data(), p(o.o_proj), o_slice);
    std::vector<T> partial(static_cast<size_t>(s.rows * h));  // [batch, n * seq, h]
    ops::linear_forward(partial.data(), a.att.data(), slice_weights_.data(),
                        static_cast<const T*>(nullptr), s.rows, q_cols, h);
    reduce_scatter_sequences(a.residual_mid.data(), partial.data(), batch, seq, h, ep_,
                             group_scratch_);
  } else {
    ops::linear_forward(a.residual_mid.data(), a.att.data(), p(o.o_proj),
                        static_cast<const T*>(nullptr), n, qd, h);
  }
  ops::add_inplace(a.residual_mid.data(), a.residual_in.data(), n * h);
}

template <typename T>
void Transformer<T>::sparse_prefill_attention(int64_t l) {
  LayerActivations& a = acts_[static_cast<size_t>(l)];
  // q [seq, num_heads, head_dim]; k, v [seq, num_kv_heads, head_dim] (batch 1, empty cache).
  const ops::SparseAttentionDims dims{seq_, config_.num_heads, config_.num_kv_heads,
                                      config_.head_dim};
  ops::FlexPrefillSelection selection =
      ops::flex_prefill_select(a.q.data(), a.k.data(), dims, prefill_attention_.params);
  ops::block_sparse_attention_forward(a.att.data(), static_cast<T*>(nullptr), a.q.data(),
                                      a.k.data(), a.v.data(), selection.layout, dims);
  PrefillLayerStats& stats = prefill_stats_[static_cast<size_t>(l)];
  stats.dense_fallback = selection.dense_fallback;
  stats.head_stats = std::move(selection.head_stats);
}

template <typename T>
void Transformer<T>::ffn_forward(int64_t l, int64_t n, T* out) {
  const LayerOffsets& o = layout_.layer(l);
  LayerActivations& a = acts_[static_cast<size_t>(l)];
  const int64_t h = config_.hidden_size;
  ops::rmsnorm_forward(a.ln2.data(), a.rstd2.data(), a.residual_mid.data(),
                       p(o.post_attention_norm), n, h, config_.rms_norm_eps);
  if (config_.layer_is_moe(l)) {
    MoeFfnStats stats;
    moe_ffn_forward(out, a.moe, stats, a.ln2.data(), moe_weights(o), moe_dims(n, l), ep_);
    moe_stats_.push_back(std::move(stats));
  } else if (tensor_parallel()) {
    // Column-parallel gate/up, row-parallel down on this rank's intermediate columns, over the
    // group's tokens; the partial sums reduce-scattered.
    const int64_t group_tokens = n * ep_.size();
    const ColumnSlice down = ffn_slice(config_.intermediate_size);
    a.ln2_group.resize(static_cast<size_t>(group_tokens * h));
    ep_.all_gather(a.ln2.data(), a.ln2_group.data(), static_cast<size_t>(n * h));
    slice_weights_.resize(static_cast<size_t>(h * down.width));
    pack_columns(slice_weights_.data(), p(o.mlp_down), down);
    std::vector<T> partial(a.ln2_group.size());  // [group_tokens, h]
    dense_ffn_forward(partial.data(), a.dense, a.ln2_group.data(), p(o.mlp_gate) + down.begin * h,
                      p(o.mlp_up) + down.begin * h, slice_weights_.data(), group_tokens, h,
                      down.width);
    ep_.reduce_scatter_sum(partial.data(), out, static_cast<size_t>(n * h));
  } else {
    dense_ffn_forward(out, a.dense, a.ln2.data(), p(o.mlp_gate), p(o.mlp_up), p(o.mlp_down), n, h,
                      config_.intermediate_size);
  }
  ops::add_inplace(out, a.residual_mid.data(), n * h);
}

template <typename T>
void Transformer<T>::run_layers(int64_t batch, int64_t seq, KvCache<T>* cache) {
  const int64_t n = batch * seq;
  const int64_t h = config_.hidden_size;
  moe_stats_.clear();
  for (int64_t i = 0; i < n; ++i) {
    // Global positions: a cache's length, or this rank's first position in the sequence.
    const int64_t first = cache != nullptr ? cache->length : ep_.rank() * seq;
    positions_[i] = static_cast<int32_t>(first + i % seq);
  }
  const int64_t full_seq = ep_.size() * seq;  // tensor parallel: the full sequences' positions
  for (size_t i = 0; i < group_positions_.size(); ++i) {
    group_positions_[i] = static_cast<int32_t>(static_cast<int64_t>(i) % full_seq);
  }
  ops::embedding_forward(x_.data(), tokens_.data(), p(layout_.embed_tokens()), n, h);
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    LayerActivations& a = acts_[static_cast<size_t>(l)];
    std::copy(x_.begin(), x_.begin() + n * h, a.residual_in.begin());
    attention_forward(l, batch, seq, cache);
    ffn_forward(l, n, x_.data());
  }
  ops::rmsnorm_forward(lnf_.data(), rstdf_.data(), x_.data(), p(layout_.final_norm()), n, h,
                       config_.rms_norm_eps);
}

template <typename T>
LossBreakdown Transformer<T>::forward(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                      int64_t seq) {
  MF_CHECK(batch > 0 && seq > 0, "forward needs a non-empty batch, got [{}, {}]", batch, seq);
  const int64_t n = batch * seq;
  resize_activations(batch, seq);
  for (int64_t i = 0; i < n; ++i) {
    MF_CHECK(tokens[i] >= 0 && tokens[i] < config_.vocab_size,
             "token {} at position {} is outside the vocabulary [0, {})", tokens[i], i,
             config_.vocab_size);
  }
  std::copy(tokens, tokens + n, tokens_.begin());
  std::copy(targets, targets + n, targets_.begin());
  run_layers(batch, seq, nullptr);
  ops::linear_forward(logits_.data(), lnf_.data(), p(layout_.lm_head()),
                      static_cast<const T*>(nullptr), n, config_.hidden_size, config_.vocab_size);

  LossBreakdown out;
  int64_t local_counted = 0;
  // Cross-entropy sum and counted targets, summed over the sequence-parallel group.
  double ce[2] = {ops::cross_entropy_forward(losses_.data(), logits_.data(), targets_.data(), n,
                                             config_.vocab_size, &local_counted),
                  static_cast<double>(local_counted)};
  if (ep_.size() > 1) ep_.all_reduce_sum(ce, 2);
  out.num_counted = static_cast<int64_t>(ce[1]);
  out.ce_loss = out.num_counted > 0 ? ce[0] / static_cast<double>(out.num_counted) : 0.0;
  for (const MoeFfnStats& s : moe_stats_) {
    out.aux_loss += s.aux_loss / static_cast<double>(num_moe_layers_);
    out.z_loss += s.z_loss / static_cast<double>(num_moe_layers_);
  }
  out.loss = out.ce_loss + config_.router_aux_loss_coef * out.aux_loss +
             config_.router_z_loss_coef * out.z_loss;
  last_ = out;
  return out;
}

template <typename T>
void Transformer<T>::ffn_backward(int64_t l, int64_t n, const T* dout, T* dinp, double d_aux,
                                  double d_z) {
  const LayerOffsets& o = layout_.layer(l);
  const LayerActivations& a = acts_[static_cast<size_t>(l)];
  const int64_t h = config_.hidden_size;
  if (config_.layer_is_moe(l)) {
    MoeFfnGrads<T> grads = moe_grads(o);
    moe_ffn_backward(dinp, grads, dout, a.ln2.data(), a.moe, moe_weights(o), moe_dims(n, l), d_aux,
                     d_z, ep_);
    if (tensor_parallel()) add_moe_slice_grads(o);
  } else if (tensor_parallel()) {
    // Mirror of the forward: all-gather dout, the slice's backward, reduce-scatter dinp.
    const int64_t group_tokens = n * ep_.size();
    const ColumnSlice down = ffn_slice(config_.intermediate_size);
    std::vector<T> dout_group(static_cast<size_t>(group_tokens * h));  // [group_tokens, h]
    ep_.all_gather(dout, dout_group.data(), static_cast<size_t>(n * h));
    slice_weights_.resize(static_cast<size_t>(h * down.width));
    pack_columns(slice_weights_.data(), p(o.mlp_down), down);
    slice_grads_.assign(slice_weights_.size(), T(0));
    std::vector<T> dinp_group(dout_group.size());  // [group_tokens, h] partial sums
    dense_ffn_backward(dinp_group.data(), g(o.mlp_gate) + down.begin * h,
                       g(o.mlp_up) + down.begin * h, slice_grads_.data(), dout_group.data(),
                       a.ln2_group.data(), a.dense, p(o.mlp_gate) + down.begin * h,
                       p(o.mlp_up) + down.begin * h, slice_weights_.data(), group_tokens, h,
                       down.width);
    add_packed_columns(g(o.mlp_down), slice_grads_.data(), down);
    ep_.reduce_scatter_sum(dinp_group.data(), dinp, static_cast<size_t>(n * h));
  } else {
    dense_ffn_backward(dinp, g(o.mlp_gate), g(o.mlp_up), g(o.mlp_down), dout, a.ln2.data(), a.dense,
                       p(o.mlp_gate), p(o.mlp_up), p(o.mlp_down), n, h, config_.intermediate_size);
  }
}

template <typename T>
void Transformer<T>::attention_backward(int64_t l, int64_t batch, int64_t seq, T* dres) {
  const LayerOffsets& o = layout_.layer(l);
  const LayerActivations& a = acts_[static_cast<size_t>(l)];
  const int64_t n = batch * seq;
  const int64_t h = config_.hidden_size, qd = config_.q_dim(), kvd = config_.kv_dim();
  const int64_t d = config_.head_dim;
  const bool tp = tensor_parallel();
  const AttentionShard s = attention_shard(batch, seq);
  const int64_t q_cols = s.num_heads * d, kv_cols = s.num_kv_heads * d;

  // [s.rows, q_cols] and [s.rows, kv_cols]: the same sizes in both layouts.
  std::vector<T> datt(n * qd), dq(n * qd), dk(n * kvd), dv(n * kvd);
  if (tp) {
    // Mirror of the forward: the full sequences' output gradient through this rank's columns.
    std::vector<T> dout(static_cast<size_t>(s.rows * h));  // [batch, n * seq, h]
    all_gather_sequences(dout.data(), dres, batch, seq, h, ep_, group_scratch_);
    const ColumnSlice o_slice{h, qd, s.q_begin, q_cols};
    slice_weights_.resize(static_cast<size_t>(h * q_cols));
    pack_columns(slice_weights_.data(), p(o.o_proj), o_slice);
    slice_grads_.assign(slice_weights_.size(), T(0));
    ops::linear_backward(datt.data(), slice_grads_.data(), static_cast<T*>(nullptr), dout.data(),
                         a.att.data(), slice_weights_.data(), s.rows, q_cols, h);
    add_packed_columns(g(o.o_proj), slice_grads_.data(), o_slice);
    const ops::AttentionDims dims{batch, s.seq, s.seq, s.num_heads, s.num_kv_heads, d};
    ops::attention_backward(dq.data(), dk.data(), dv.data(), datt.data(), a.q.data(), a.k.data(),
                            a.v.data(), a.probs.data(), dims);
  } else if (ep_.size() > 1) {
    ops::linear_backward(datt.data(), g(o.o_proj), static_cast<T*>(nullptr), dres, a.att.data(),
                         p(o.o_proj), n, qd, h);
    // Mirror of the forward: d(att) sequence -> heads, attention, dq/dk/dv heads -> sequence.
    const int64_t num_ranks = ep_.size();
    const int64_t full_seq = num_ranks * seq;
    const ops::AttentionDims head_dims{
        batch, full_seq, full_seq, config_.num_heads / num_ranks, config_.num_kv_heads / num_ranks,
        d};
    std::vector<T> datt_heads(n * qd), dq_heads(n * qd);
    std::vector<T> dk_heads(n * kvd), dv_heads(n * kvd);
    exchange_heads({{datt.data(), datt_heads.data(), config_.num_heads}}, true, batch, seq);
    ops::attention_backward(dq_heads.data(), dk_heads.data(), dv_heads.data(), datt_heads.data(),
                            a.q_heads.data(), a.k_heads.data(), a.v_heads.data(), a.probs.data(),
                            head_dims);
    exchange_heads({{dq.data(), dq_heads.data(), config_.num_heads},
                    {dk.data(), dk_heads.data(), config_.num_kv_heads},
                    {dv.data(), dv_heads.data(), config_.num_kv_heads}},
                   false, batch, seq);
  } else {
    ops::linear_backward(datt.data(), g(o.o_proj), static_cast<T*>(nullptr), dres, a.att.data(),
                         p(o.o_proj), n, qd, h);
    const ops::AttentionDims dims{batch, seq, seq, config_.num_heads, config_.num_kv_heads, d};
    ops::attention_backward(dq.data(), dk.data(), dv.data(), datt.data(), a.q.data(), a.k.data(),
                            a.v.data(), a.probs.data(), dims);
  }
  const int32_t* positions = tp ? group_positions_.data() : positions_.data();
  ops::rope_backward(dq.data(), dq.data(), positions, s.rows, s.num_heads, d, config_.rope_theta);
  ops::rope_backward(dk.data(), dk.data(), positions, s.rows, s.num_kv_heads, d,
                     config_.rope_theta);
  if (config_.qk_norm) {
    std::vector<T> dq_lin(n * qd), dk_lin(n * kvd);
    ops::rmsnorm_backward(dq_lin.data(), g(o.q_norm), dq.data(), a.q_lin.data(), p(o.q_norm),
                          a.rstd_q.data(), s.rows * s.num_heads, d);
    ops::rmsnorm_backward(dk_lin.data(), g(o.k_norm), dk.data(), a.k_lin.data(), p(o.k_norm),
                          a.rstd_k.data(), s.rows * s.num_kv_heads, d);
    dq.swap(dq_lin);
    dk.swap(dk_lin);
  }
  // The projections of this rank's heads (column-parallel rows under tensor parallelism).
  const T* x = tp ? a.ln1_group.data() : a.ln1.data();                 // [s.rows, h]
  std::vector<T> dx(static_cast<size_t>(s.rows * h)), tmp(dx.size());  // [s.rows, h]
  ops::linear_backward(dx.data(), g(o.q_proj) + s.q_begin * h,
                       offset_or_null(g(o.q_bias), s.q_begin), dq.data(), x,
                       p(o.q_proj) + s.q_begin * h, s.rows, h, q_cols);
  ops::linear_backward(tmp.data(), g(o.k_proj) + s.kv_begin * h,
                       offset_or_null(g(o.k_bias), s.kv_begin), dk.data(), x,
                       p(o.k_proj) + s.kv_begin * h, s.rows, h, kv_cols);
  ops::add_inplace(dx.data(), tmp.data(), s.rows * h);
  ops::linear_backward(tmp.data(), g(o.v_proj) + s.kv_begin * h,
                       offset_or_null(g(o.v_bias), s.kv_begin), dv.data(), x,
                       p(o.v_proj) + s.kv_begin * h, s.rows, h, kv_cols);
  ops::add_inplace(dx.data(), tmp.data(), s.rows * h);
  std::vector<T> dln1(n * h);  // [n, h] the local tokens' gradient of ln1
  if (tp) {
    reduce_scatter_sequences(dln1.data(), dx.data(), batch, seq, h, ep_, group_scratch_);
  } else {
    dln1.swap(dx);
  }
  ops::rmsnorm_backward(tmp.data(), g(o.input_norm), dln1.data(), a.residual_in.data(),
                        p(o.input_norm), a.rstd1.data(), n, h);
  ops::add_inplace(dres, tmp.data(), n * h);
}

template <typename T>
void Transformer<T>::backward(double dloss, double ce_count) {
  MF_CHECK(batch_ > 0, "backward called before forward");
  const int64_t n = batch_ * seq_;
  const int64_t h = config_.hidden_size;
  const int64_t vocab = config_.vocab_size;

  std::vector<T> dlogits(n * vocab);
  const double divisor = ce_count > 0.0 ? ce_count : static_cast<double>(last_.num_counted);
  const double dce = divisor > 0.0 ? dloss / divisor : 0.0;
  ops::cross_entropy_backward(dlogits.data(), logits_.data(), targets_.data(), n, vocab, dce);
  std::vector<T> dlnf(n * h), dres(n * h), dtmp(n * h);
  ops::linear_backward(dlnf.data(), g(layout_.lm_head()), static_cast<T*>(nullptr), dlogits.data(),
                       lnf_.data(), p(layout_.lm_head()), n, h, vocab);
  ops::rmsnorm_backward(dres.data(), g(layout_.final_norm()), dlnf.data(), x_.data(),
                        p(layout_.final_norm()), rstdf_.data(), n, h);

  const double d_aux =
      num_moe_layers_ ? dloss * config_.router_aux_loss_coef / static_cast<double>(num_moe_layers_)
                      : 0;
  const double d_z = num_moe_layers_
                         ? dloss * config_.router_z_loss_coef / static_cast<double>(num_moe_layers_)
                         : 0;
  for (int64_t l = config_.num_layers - 1; l >= 0; --l) {
    const LayerOffsets& o = layout_.layer(l);
    const LayerActivations& a = acts_[static_cast<size_t>(l)];
    // dres is the gradient of the layer's output; the FFN branch reads ln2 = norm(residual_mid).
    ffn_backward(l, n, dres.data(), dtmp.data(), d_aux, d_z);
    std::vector<T> dmid(n * h);
    ops::rmsnorm_backward(dmid.data(), g(o.post_attention_norm), dtmp.data(), a.residual_mid.data(),
                          p(o.post_attention_norm), a.rstd2.data(), n, h);
    ops::add_inplace(dres.data(), dmid.data(), n * h);
    attention_backward(l, batch_, seq_, dres.data());
  }
  ops::embedding_backward(g(layout_.embed_tokens()), dres.data(), tokens_.data(), n, h);
}

template <typename T>
void Transformer<T>::set_prefill_attention(const PrefillAttention& attention) {
  check_prefill_attention(attention);
  prefill_attention_ = attention;
}

template <typename T>
void Transformer<T>::run_incremental(const int32_t* tokens, int64_t num_new, KvCache<T>& cache) {
  MF_CHECK(num_new > 0, "forward_incremental needs at least one token");
  MF_CHECK(
      ep_.size() == 1,
      "forward_incremental runs on one rank, but the model's group has {} ranks (decode with a "
      "model built on a SelfCommunicator)",
      ep_.size());
  resize_activations(1, num_new);
  for (int64_t i = 0; i < num_new; ++i) {
    MF_CHECK(tokens[i] >= 0 && tokens[i] < config_.vocab_size,
             "token {} is outside the vocabulary [0, {})", tokens[i], config_.vocab_size);
  }
  std::copy(tokens, tokens + num_new, tokens_.begin());
  sparse_prefill_ = prefill_attention_.flex && cache.length == 0 && num_new > 1;
  if (sparse_prefill_) prefill_stats_.assign(static_cast<size_t>(config_.num_layers), {});
  run_layers(1, num_new, &cache);
  sparse_prefill_ = false;
  cache.length += num_new;
}

template <typename T>
void Transformer<T>::forward_incremental(const int32_t* tokens, int64_t num_new, KvCache<T>& cache,
                                         T* last_logits) {
  run_incremental(tokens, num_new, cache);
  const int64_t h = config_.hidden_size;
  ops::linear_forward(last_logits, lnf_.data() + (num_new - 1) * h, p(layout_.lm_head()),
                      static_cast<const T*>(nullptr), 1, h, config_.vocab_size);
}

template <typename T>
const std::vector<T>& Transformer<T>::router_logits(int64_t l) const {
  MF_CHECK(l >= 0 && l < config_.num_layers && config_.layer_is_moe(l),
           "layer {} is not an MoE layer of this model", l);
  return acts_[static_cast<size_t>(l)].moe.logits;
}

template <typename T>
const std::vector<T>& Transformer<T>::last_queries(int64_t l) const {
  MF_CHECK(l >= 0 && l < config_.num_layers, "layer {} is outside [0, {})", l, config_.num_layers);
  return acts_[static_cast<size_t>(l)].q;
}

template <typename T>
void Transformer<T>::forward_prefill(const int32_t* tokens, int64_t num_new, KvCache<T>& cache,
                                     T* logits) {
  run_incremental(tokens, num_new, cache);
  ops::linear_forward(logits, lnf_.data(), p(layout_.lm_head()), static_cast<const T*>(nullptr),
                      num_new, config_.hidden_size, config_.vocab_size);
}

template struct KvCache<float>;
template struct KvCache<double>;
template class Transformer<float>;
template class Transformer<double>;

}  // namespace moeforge
