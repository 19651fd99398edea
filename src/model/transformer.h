// The decoder-only transformer (Llama / Qwen / Mixtral family) with a hand-written forward and
// backward over the CPU reference ops. One flat parameter buffer and one flat gradient buffer in
// the HF-named layout of ParameterLayout. T is float for training and double for gradient checks.
//
// Loss of a forward: ce + router_aux_loss_coef * mean_l(aux_l) + router_z_loss_coef * mean_l(z_l),
// where ce is the mean cross-entropy over the counted targets and l runs over the MoE layers.
// backward(dloss) accumulates dloss * d(loss)/d(params) into the gradient buffer (+=).
//
// Sequence parallelism (MegaScale-MoE, Ulysses): with an expert-parallel group of n = ep.size()
// ranks, the same group also splits every sequence: rank r holds positions [r * seq, (r + 1) * seq)
// of each of the batch's sequences, where seq is the local length passed to forward (full length
// n * seq). Attention exchanges q/k/v by all-to-all (sequence -> heads), runs causal attention over
// the full sequence on num_heads / n query heads and num_kv_heads / n KV heads, and exchanges the
// result back (heads -> sequence); the MoE FFN acts on the local tokens. The loss is the group's:
// the cross-entropy sums and counts are summed over the group, and aux / z losses are over the
// group's tokens, so every rank reports the same LossBreakdown, equal to the single-rank loss of
// the full sequences. backward(dloss) with the same dloss on every rank gives, on each rank, the
// gradient through its local tokens only: for replicated weights (attention, norms, router,
// embeddings, lm_head) the caller sums the gradients over the group to get the full gradient; each
// rank's expert gradients cover its local experts (the others stay zero), so the sum is also exact.
//
// Inference (forward_incremental, forward_prefill) runs one sequence with a KvCache on one rank;
// its prefills may attend block-sparsely (FlexPrefill, opt-in: set_prefill_attention and
// prefill_attention.h), its decode steps always attend densely.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "model/dense_ffn.h"
#include "model/model_config.h"
#include "model/moe_ffn.h"
#include "model/parameters.h"
#include "model/prefill_attention.h"

namespace moeforge {

// Keys and values of past positions for incremental decoding (batch 1).
template <typename T>
struct KvCache {
  int64_t capacity = 0;           // positions
  int64_t length = 0;             // positions filled
  std::vector<std::vector<T>> k;  // per layer [capacity, kv_dim]
  std::vector<std::vector<T>> v;  // per layer [capacity, kv_dim]

  KvCache(const ModelConfig& config, int64_t capacity);
};

struct LossBreakdown {
  double loss = 0.0;        // the optimised total
  double ce_loss = 0.0;     // mean cross-entropy over counted targets
  double aux_loss = 0.0;    // mean over MoE layers (before the coefficient)
  double z_loss = 0.0;      // mean over MoE layers (before the coefficient)
  int64_t num_counted = 0;  // counted targets of the whole group
};

template <typename T>
class Transformer {
 public:
  // ep: the expert- and sequence-parallel group (a SelfCommunicator for one rank). It must outlive
  // the model. With n > 1 ranks, num_heads and num_kv_heads must be divisible by n. ep_dispatch:
  // how every MoE layer sends its tokens to the experts of other ranks (a run setting, not part
  // of the config; moe_ffn.h).
  Transformer(const ModelConfig& config, Communicator& ep,
              EpDispatch ep_dispatch = EpDispatch::kAuto);

  const ModelConfig& config() const { return config_; }
  EpDispatch ep_dispatch() const { return ep_dispatch_; }
  const ParameterLayout& layout() const { return layout_; }
  std::vector<T>& params() { return params_; }
  const std::vector<T>& params() const { return params_; }
  std::vector<T>& grads() { return grads_; }

  // Normal(0, std) for matrices and embeddings, 1 for norms, 0 for biases; reproducible from seed.
  void init_random(uint64_t seed, double std);
  void zero_grads();

  // tokens, targets [batch, seq]: this rank's shard (see the top of the file); target -1 is
  // ignored. Saves what backward needs. Every rank of the group must call it with the same shape.
  LossBreakdown forward(const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq);
  // Logits [batch * seq, vocab] of the last forward.
  const std::vector<T>& logits() const { return logits_; }
  void backward(double dloss);
  // Per MoE layer statistics of the last forward (index = position among MoE layers).
  const std::vector<MoeFfnStats>& moe_stats() const { return moe_stats_; }

  // Runs num_new tokens (batch 1) at positions cache.length.., appends their keys and values to
  // the cache, and writes the logits of the last of them to last_logits [vocab]. Single rank only.
  void forward_incremental(const int32_t* tokens, int64_t num_new, KvCache<T>& cache,
                           T* last_logits);
  // The same, but writes the logits of all num_new positions to logits [num_new, vocab]: scores a
  // whole window through the prefill attention (what `moeforge eval --attention flex` runs, one
  // window per fresh cache). The training forward always attends densely.
  void forward_prefill(const int32_t* tokens, int64_t num_new, KvCache<T>& cache, T* logits);

  // Attention of the sparse prefills (prefill_attention.h says which calls are); dense by default.
  // Throws moeforge::Error naming the field if the flex parameters are invalid.
  void set_prefill_attention(const PrefillAttention& attention);
  const PrefillAttention& prefill_attention() const { return prefill_attention_; }
  // Per layer [num_layers] selection statistics of the last sparse prefill; later decode steps and
  // dense calls keep them; empty until a sparse prefill ran.
  const std::vector<PrefillLayerStats>& prefill_stats() const { return prefill_stats_; }
  // Layer l's queries of the last forward_incremental call, after q/k norm and RoPE, as attention
  // reads them: [num_new * num_heads * head_dim] at the front of the returned buffer (the keys and
  // values of all cached positions are in the KvCache).
  const std::vector<T>& last_queries(int64_t l) const;

 private:
  struct LayerActivations {
    std::vector<T> residual_in, ln1, rstd1;
    std::vector<T> q_lin, k_lin, rstd_q, rstd_k;  // before q/k norm and RoPE
    std::vector<T> q, k, v;                       // after RoPE
    std::vector<T> probs, att;
    // With n > 1 ranks: this rank's heads over the full sequence [batch, n * seq, heads / n, dim].
    std::vector<T> q_heads, k_heads, v_heads, att_heads;
    std::vector<T> residual_mid, ln2, rstd2;
    DenseFfnSaved<T> dense;
    MoeFfnSaved<T> moe;
  };

  void resize_activations(int64_t batch, int64_t seq);
  // Checks and runs num_new tokens at positions cache.length.. (batch 1); leaves lnf_ filled.
  void run_incremental(const int32_t* tokens, int64_t num_new, KvCache<T>& cache);
  // Block-sparse attention of a sparse prefill for one layer: a.q, a.k, a.v -> a.att.
  void sparse_prefill_attention(int64_t layer_idx);
  // Runs the decoder layers and the final norm on x_ (n = batch * seq tokens); cache may be null.
  void run_layers(int64_t batch, int64_t seq, KvCache<T>* cache);
  void attention_forward(int64_t layer_idx, int64_t batch, int64_t seq, KvCache<T>* cache);
  void attention_backward(int64_t layer_idx, int64_t batch, int64_t seq, T* dres);
  // All-to-all between the sequence layout [batch, seq, heads, dim] of each tensor and its heads
  // layout [batch, n * seq, heads / n, dim]; to_heads picks the direction (the other side is
  // assigned).
  struct HeadShard {
    T* local;
    T* heads;
    int64_t num_heads;
  };
  void exchange_heads(const std::vector<HeadShard>& shards, bool to_heads, int64_t batch,
                      int64_t seq);
  void ffn_forward(int64_t layer_idx, int64_t n, T* out);
  void ffn_backward(int64_t layer_idx, int64_t n, const T* dout, T* dinp, double d_aux, double d_z);
  MoeFfnDims moe_dims(int64_t n) const;
  int64_t local_experts_offset() const;  // elements from an expert block to this rank's experts
  MoeFfnWeights<T> moe_weights(const LayerOffsets& o) const;
  MoeFfnGrads<T> moe_grads(const LayerOffsets& o);
  const T* p(int64_t offset) const { return offset < 0 ? nullptr : params_.data() + offset; }
  T* g(int64_t offset) { return offset < 0 ? nullptr : grads_.data() + offset; }

  ModelConfig config_;
  ParameterLayout layout_;
  Communicator& ep_;
  EpDispatch ep_dispatch_;
  int64_t num_moe_layers_ = 0;
  std::vector<T> params_, grads_;

  int64_t batch_ = 0, seq_ = 0;
  std::vector<int32_t> tokens_, targets_, positions_;
  std::vector<LayerActivations> acts_;
  std::vector<T> x_;  // [n, hidden] residual stream at the end of the layers
  std::vector<T> lnf_, rstdf_, logits_, losses_;
  std::vector<T> send_, recv_;  // all-to-all packing buffers
  std::vector<MoeFfnStats> moe_stats_;
  PrefillAttention prefill_attention_;
  bool sparse_prefill_ = false;  // the running forward_incremental call is a sparse prefill
  std::vector<PrefillLayerStats> prefill_stats_;
  LossBreakdown last_;
};

}  // namespace moeforge
