// The decoder-only transformer (Llama / Qwen / Mixtral family) with a hand-written forward and
// backward over the CPU reference ops. One flat parameter buffer and one flat gradient buffer in
// the HF-named layout of ParameterLayout. T is float for training and double for gradient checks.
//
// Loss of a forward: ce + router_aux_loss_coef * mean_l(aux_l) + router_z_loss_coef * mean_l(z_l),
// where ce is the mean cross-entropy over the counted targets and l runs over the MoE layers.
// backward(dloss) accumulates dloss * d(loss)/d(params) into the gradient buffer (+=).
// backward(dloss, ce_count) with ce_count > 0 divides the cross-entropy's gradient by ce_count
// instead of the forward's counted targets: the trainer's gradient accumulation averages the
// cross-entropy over all counted targets of a step (micro-batches may count different numbers).
//
// Sequence parallelism (MegaScale-MoE, Ulysses): with an expert-parallel group of n = ep.size()
// ranks, the same group also splits every sequence: rank r holds positions [r * seq, (r + 1) * seq)
// of each of the batch's sequences, where seq is the local length passed to forward (full length
// n * seq). Attention exchanges q/k/v by all-to-all (sequence -> heads), runs causal attention over
// the full sequence on num_heads / n query heads and num_kv_heads / n KV heads, and exchanges the
// result back (heads -> sequence); the MoE FFN acts on the local tokens. The loss is the group's:
// the cross-entropy sums and counts are summed over the group, and aux / z losses are over the
// group's tokens, so every rank reports the same LossBreakdown, equal to the single-rank loss of
// the full sequences. Each rank holds only its experts [r E / n, (r + 1) E / n) of every MoE layer
// (ParameterLayout's ExpertShard: the flat buffers are the whole model's with the other ranks'
// experts left out). backward(dloss) with the same dloss on every rank gives, on each rank, for
// replicated weights (attention, norms, router, embeddings, lm_head; layout().replicated_ranges())
// the gradient through its local tokens only, which the caller sums over the group; for its
// experts (layout().expert_ranges()) the whole group's gradient, as they saw every token routed
// to them.
//
// Tensor parallelism (ParallelLayout::kTensor, Megatron-LM's baseline of the paper's ablation;
// model/tensor_parallel.h has the data flow and both layouts' communication volumes): the same
// group and the same sequence shards, with the norms and residual adds on the local positions,
// but attention, MoE and dense FFN layers split their weights: attention by heads (column-parallel
// q/k/v, row-parallel o_proj), FFNs by intermediate columns, each between an all-gather and a
// reduce-scatter along the sequence. The loss is the group's, as above. backward(dloss) gives
// each rank the gradient of its slice of the split weights (zero elsewhere) and, for the
// replicated ones (norms, router, shared expert gate, embeddings, lm_head), its local tokens'
// contribution; q_norm and k_norm get their heads' contribution over all tokens. The sum over the
// group is again the full gradient. Every rank holds and updates all weights (the checkpoint
// layout). With one rank both layouts are the single-rank model.
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
#include "model/tensor_parallel.h"

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
  // ep: the group of n ranks that shares each sequence (a SelfCommunicator for one rank), expert-
  // and sequence-parallel or tensor-parallel as parallel_layout says. It must outlive the model.
  // With n > 1 ranks, num_heads and num_kv_heads must be divisible by n; sp_ep needs num_experts,
  // tp the intermediate sizes (intermediate_size of dense layers, moe_intermediate_size and
  // shared_expert_intermediate_size) divisible by n. ep_dispatch: how each MoE layer sends its
  // tokens to the experts of other ranks under sp_ep, one dispatch for every layer or one per
  // decoder layer (a run setting, not part of the config; moe_ffn.h).
  Transformer(const ModelConfig& config, Communicator& ep,
              EpDispatchPlan ep_dispatch = EpDispatch::kAuto,
              ParallelLayout parallel_layout = ParallelLayout::kSequenceExpert);

  const ModelConfig& config() const { return config_; }
  // The sequence/expert-parallel (or tensor-parallel) group given to the constructor.
  Communicator& expert_group() const { return ep_; }
  const EpDispatchPlan& ep_dispatch() const { return ep_dispatch_; }
  ParallelLayout parallel_layout() const { return parallel_layout_; }
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
  void backward(double dloss, double ce_count = 0.0);
  // Per MoE layer statistics of the last forward (index = position among MoE layers).
  const std::vector<MoeFfnStats>& moe_stats() const { return moe_stats_; }
  // Router logits [routed tokens, num_experts] of layer l (an MoE layer) in the last forward: on
  // one rank every token of the batch in order (under parallelism MoeFfnSaved's routed tokens).
  const std::vector<T>& router_logits(int64_t l) const;

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
    // Tensor parallel: ln1 all-gathered [batch, n * seq, hidden] (q_lin ... att hold this rank's
    // heads over the full sequences, [batch, n * seq, heads / n, dim]), and ln2 all-gathered
    // [n * batch * seq, hidden] (rank by rank) for a dense FFN.
    std::vector<T> ln1_group, ln2_group;
    std::vector<T> residual_mid, ln2, rstd2;
    DenseFfnSaved<T> dense;
    MoeFfnSaved<T> moe;
  };

  void resize_activations(int64_t batch, int64_t seq);
  // n > 1 ranks with ParallelLayout::kTensor (with one rank both layouts run the same code).
  bool tensor_parallel() const {
    return parallel_layout_ == ParallelLayout::kTensor && ep_.size() > 1;
  }
  // What this rank's attention projects: its local tokens with all heads, or under tensor
  // parallelism the group's full sequences with its heads.
  struct AttentionShard {
    int64_t rows;  // tokens: batch * seq, or batch * n * seq
    int64_t seq;   // positions per sequence: seq, or n * seq
    int64_t num_heads, num_kv_heads;
    int64_t q_begin, kv_begin;  // this rank's first column of q_dim and of kv_dim
  };
  AttentionShard attention_shard(int64_t batch, int64_t seq) const;
  // Tensor parallel: this rank's column slice [begin, begin + ffn / n) of an FFN's intermediate
  // dimension ffn, as the columns of its down projection [hidden, ffn] (begin * hidden is the
  // offset of the matching rows of gate and up).
  ColumnSlice ffn_slice(int64_t ffn) const;
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
  MoeFfnDims moe_dims(int64_t n, int64_t l) const;  // of decoder layer l on n local tokens
  // Tensor parallel: the MoE layer's weights are this rank's slices packed into slice_weights_,
  // its gradients go to slice_grads_ (zeroed by moe_grads), and add_moe_slice_grads adds them
  // into grads_ (moe_ffn.h).
  MoeFfnWeights<T> moe_weights(const LayerOffsets& o);
  MoeFfnGrads<T> moe_grads(const LayerOffsets& o);
  void add_moe_slice_grads(const LayerOffsets& o);
  const T* p(int64_t offset) const { return offset < 0 ? nullptr : params_.data() + offset; }
  T* g(int64_t offset) { return offset < 0 ? nullptr : grads_.data() + offset; }

  ModelConfig config_;
  ParameterLayout layout_;
  Communicator& ep_;
  EpDispatchPlan ep_dispatch_;
  ParallelLayout parallel_layout_;
  int64_t num_moe_layers_ = 0;
  std::vector<T> params_, grads_;

  int64_t batch_ = 0, seq_ = 0;
  std::vector<int32_t> tokens_, targets_, positions_;
  std::vector<int32_t> group_positions_;  // tensor parallel: [batch, n * seq] positions for RoPE
  std::vector<LayerActivations> acts_;
  std::vector<T> x_;  // [n, hidden] residual stream at the end of the layers
  std::vector<T> lnf_, rstdf_, logits_, losses_;
  std::vector<T> send_, recv_;  // all-to-all packing buffers
  // Tensor parallel: a layer's weight slices packed, their gradients, the collectives' buffer.
  std::vector<T> slice_weights_, slice_grads_, group_scratch_;
  std::vector<MoeFfnStats> moe_stats_;
  PrefillAttention prefill_attention_;
  bool sparse_prefill_ = false;  // the running forward_incremental call is a sparse prefill
  std::vector<PrefillLayerStats> prefill_stats_;
  LossBreakdown last_;
};

}  // namespace moeforge
