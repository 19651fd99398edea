// The decoder (model/transformer.h is the spec) on one GPU: fp32 master weights with a bf16 copy
// for the GEMMs, bf16 activations, an fp32 residual stream, fp32 gradients that accumulate across
// micro-batches, and a hand-written backward over the kernels of src/cuda. The LM head and the
// cross-entropy run in chunks of rows, and their backward runs inside the forward when a
// gradient is requested, so no [tokens, vocab] fp32 tensor is ever materialised.
//
// Activation recompute (MegaScale-MoE section 2): kNone keeps every activation the backward reads
// but one: the expert-sorted copy of an MoE layer's input, which the backward gathers again from
// ln2 (a copy, no arithmetic; 128 MiB per layer at the bench config). kSelective keeps one shared
// buffer for the normed inputs (ln1, ln2) and the SwiGLU output, and recomputes them layer by
// layer in the backward from what is saved (the residual stream, rstd, the gate and up
// projections).
//
// Supported: every architecture of model_config.h, the sigmoid-gated shared expert of Qwen2-MoE
// included, and capacity-based token dropping (capacity_factor > 0: each expert keeps its earliest
// tokens' rows up to ceil(factor x tokens x top_k / experts) per micro-batch, as the CPU reference
// does). On one GPU, over a sequence/expert-parallel group of n GPUs (set_expert_parallel_group:
// MegaScale-MoE's layout, model/transformer.h's "sp_ep", each MoE layer with the all-gather or the
// all-to-all dispatch), or over a tensor-parallel group (set_tensor_parallel_group: the Megatron-LM
// baseline, "tp", gpu_transformer_tensor_parallel.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "cuda/attention.h"
#include "cuda/bf16.h"
#include "cuda/blas.h"
#include "cuda/device_info.h"
#include "cuda/device_memory.h"
#include "cuda/event_pool.h"
#include "cuda/grad_reduce_device.h"
#include "cuda/grouped_gemm.h"
#include "cuda/phase_timer.h"
#include "cuda/stream_graph.h"
#include "cuda/ulysses_exchange.h"
#include "model/model_config.h"
#include "model/parameters.h"
#include "model/transformer.h"
#include "train/grad_buckets.h"
#include "train/grad_reduce.h"

namespace moeforge::cuda {

enum class Recompute { kNone, kSelective };

// What a backward does with the gradient buffer: add to it (later micro-batches), or assign this
// micro-batch's gradients (the first one: no zeroing beforehand, and the weight-gradient GEMMs
// write their output without reading it).
enum class GradMode { kAccumulate, kAssign };

// How the MoE exchanges of expert parallelism run (set_expert_parallel_group).
struct ExpertExchange {
  // The dtype of the all-gather dispatch's exchanges of fp32 activations (TrainConfig's
  // parallel.ep_comm_dtype): with kBfloat16 the forward's reduce-scatter of the combined expert
  // outputs and the backward's of the input gradient are DeviceGradReducer's bf16 reduce-scatter
  // (one cast, an all-to-all, a rank-ordered fp32 sum) and the backward's all-gather of the output
  // gradient travels in bf16. Layers of the all-to-all dispatch exchange only bf16 rows, which the
  // expert GEMMs read and write in bf16 anyway, whatever this says.
  GradReduceDtype dtype = GradReduceDtype::kFloat32;
  // parallel.ep_overlap_chunks: every MoE layer runs in that many chunks of each rank's tokens,
  // the exchanges of one chunk (on stream()) overlapping the experts of another (on a second
  // stream of the model); 1: one all-gather before the experts and one reduce-scatter after them
  // (in the backward, beside the experts' weight gradients). More than 1 needs capacity_factor 0
  // (token dropping keeps each expert's earliest rows of the whole group, which chunks would
  // change) and the all-gather dispatch in every MoE layer. A forward uses the largest divisor of
  // it that divides its tokens per rank (expert_overlap_chunks()).
  int64_t overlap_chunks = 1;
  // parallel.ep_dispatch: how each MoE layer reaches the experts of other ranks (kAuto by
  // choose_ep_dispatch's rule on top_k and the group size). The default, the all-gather, is what
  // bench train runs unless told otherwise; the trainer passes the training config's plan.
  EpDispatchPlan dispatch = EpDispatch::kAllGather;
};

// "none" or "selective"; throws on anything else.
Recompute parse_recompute(const std::string& name);

class GpuTransformer {
 public:
  // experts: the experts this rank holds (ParameterLayout); a shard of several only for a rank
  // of an expert-parallel group of as many GPUs (set_expert_parallel_group).
  explicit GpuTransformer(const ModelConfig& config, Recompute recompute = Recompute::kNone,
                          ExpertShard experts = {});
  ~GpuTransformer();
  GpuTransformer(const GpuTransformer&) = delete;
  GpuTransformer& operator=(const GpuTransformer&) = delete;

  // Makes this model one rank of a sequence/expert-parallel group: `group` is a device
  // communicator (NCCL) over the group's n ranks whose collectives run on stream(). Each rank then
  // gets `seq` positions of every sequence (rank r the r-th slice of n * seq) and computes, as the
  // CPU reference's layout "sp_ep": attention Ulysses-style (an all-to-all to heads / n heads over
  // all n * seq positions and back; n must divide both head counts), and every MoE layer on the
  // group's tokens with the experts [r E / n, (r + 1) E / n) only (all-gather, local experts,
  // reduce-scatter, or the all-to-all dispatch as exchange.dispatch says; n must divide the
  // experts), which are the only ones it holds: an MoE model must have been constructed with
  // ExpertShard{r, n}. Losses are the group's; the gradients of the replicated weights are this
  // rank's tokens' part, which a sum over the group completes, its experts' are the group's
  // already. Call it before the first forward; n = 1 changes nothing.
  void set_expert_parallel_group(Communicator& group, const ExpertExchange& exchange = {});
  int64_t expert_parallel_size() const { return ep_ != nullptr ? ep_->size() : 1; }
  // Makes this model rank r of a tensor-parallel group of n GPUs instead (model/transformer.h's
  // layout "tp", Megatron-LM's tensor parallelism with sequence-parallel norms, the baseline of
  // MegaScale-MoE's ablation; model/tensor_parallel.h is the spec): `group` is a device
  // communicator (NCCL) over the n ranks whose collectives run on stream(). Each rank gets `seq`
  // positions of every sequence, as above, and holds every weight (the model must hold every
  // expert: no ExpertShard), of which it uses its slices: query heads [r H / n, (r + 1) H / n) and
  // KV heads likewise (rows of q/k/v_proj and their biases, columns of o_proj), and columns
  // [r F / n, (r + 1) F / n) of every FFN's intermediate dimension F (rows of gate and up, columns
  // of down; every expert and the shared expert, or the dense MLP); n must divide the head counts
  // and the intermediate sizes. Between the parallel regions the activations stay sharded along
  // the sequence: the normed input is all-gathered (bf16) before the column-parallel projections
  // and the row-parallel output reduce-scattered (fp32), and the backward mirrors both. The router
  // runs on the group's tokens, identically on every rank. Losses are the group's; a backward
  // writes this rank's slices of the split weights (zeros elsewhere) and, for the replicated ones,
  // its own tokens' part (q_norm and k_norm: its heads' over all tokens; the shared expert's gate:
  // its partial sums over all tokens), so the sum over the group is the whole gradient, as on the
  // CPU. Runs eagerly on stream() without overlap (the ablation's "TP+TP, no overlap"); CUDA
  // graphs are refused. Call it before the first forward, instead of set_expert_parallel_group;
  // n = 1 changes nothing.
  void set_tensor_parallel_group(Communicator& group);
  int64_t tensor_parallel_size() const { return tp_ != nullptr ? tp_->size() : 1; }
  // The dispatch MoE layer l runs (kAllGather on one GPU, where nothing is exchanged).
  EpDispatch expert_dispatch(int64_t l) const {
    return a2a_layer(l) ? EpDispatch::kAllToAll : EpDispatch::kAllGather;
  }
  // The chunks the MoE layers of the last forward ran in (1 without expert parallelism).
  int64_t expert_overlap_chunks() const { return ep_chunks_; }

  const ModelConfig& config() const { return config_; }
  const ParameterLayout& layout() const { return layout_; }
  cudaStream_t stream() const { return stream_; }
  int64_t num_params() const { return layout_.num_params(); }
  // Waits for the model's stream.
  void synchronize() const;

  // Master weights from/to the host (flat ParameterLayout order); the bf16 copy follows.
  void upload_params(const std::vector<float>& host);
  std::vector<float> download_params() const;
  std::vector<float> download_grads() const;
  void upload_grads(const std::vector<float>& host);
  void zero_grads();
  // Rounds the master weights into the bf16 copy (after changing them outside the optimizer).
  void refresh_bf16_params();
  // Grows the flat buffers (weights, their bf16 copy, gradients) to length elements, the tail past
  // num_params zeros, keeping their contents: ZeRO-1's equal-chunk collectives work on whole
  // buffers of ranks x shard length (cuda/gpu_zero_adamw.h). The host copies stay num_params long.
  void pad_flat_buffers(int64_t length);
  // The ranges of the flat buffer, in offset order, whose fp32 weights the forward and backward
  // read: the norms, the biases and the embedding table. Every other weight is read through its
  // bf16 copy only (what lets ZeRO-1 all-gather those in bf16).
  std::vector<GradRange> fp32_weight_ranges() const;

  float* params() { return params_.data(); }
  bf16* params_bf16() { return params_bf16_.data(); }
  float* grads() { return grads_.data(); }

  // tokens, targets [batch, seq] on the host (target -1: ignored). With dloss != 0, also runs the
  // backward and adds dloss * d(loss)/d(params) to the gradients (kAccumulate), or makes it the
  // gradients whatever the buffer held (kAssign); ce_count > 0 divides the cross-entropy's
  // gradient as in Transformer<float>::backward. Returns the loss as Transformer<float>::forward
  // does.
  LossBreakdown forward_backward(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                 int64_t seq, double dloss,
                                 GradMode grad_mode = GradMode::kAccumulate, double ce_count = 0.0);

  // The ranges of the gradient buffer in the order a backward finishes them, descending offsets
  // that tile [0, num_params): the final norm with an untied LM head; then from the last layer
  // down, each layer's FFN (router, experts and shared expert, or the dense MLP) and its attention
  // with both norms; the embedding last (a tied LM head adds to it at the start of the backward).
  const std::vector<GradRange>& grad_ready_ranges() const { return grad_ready_ranges_; }
  // Called by a backward with the index in grad_ready_ranges() of each range, in order, as soon
  // as the last kernel writing it is enqueued on stream() (a data-parallel reduction can start
  // on it there). Empty: none.
  void set_grad_ready_hook(std::function<void(size_t)> hook) { grad_ready_hook_ = std::move(hook); }
  // Called by a forward with the index in grad_ready_ranges() of each range of weights before the
  // first kernel reading it is enqueued on stream() (the embedding first, then per layer its
  // attention and its FFN, the final norm and head last), so that an optimizer updating them on
  // another stream can make stream() wait for that range (GpuAdamW's overlap). Empty: none.
  void set_weights_needed_hook(std::function<void(size_t)> hook) {
    weights_needed_hook_ = std::move(hook);
  }

  // CUDA graph capture of a training step: with graphs on, forward_backward with a backward runs
  // its device work (everything between the uploads of the tokens and the read of the loss) as a
  // CUDA graph, one per (batch, seq, dloss, GradMode): the first call of each runs eagerly (it
  // sizes the libraries' workspaces), the second captures, later ones replay with one launch.
  // What changes between steps reaches the graph through device memory (tokens, targets, the
  // embedding backward's token groups, the cross-entropy's scale). Forward-only calls, steps
  // under the phase timer and forward_logits run eagerly. Needs one GPU (no expert-parallel
  // group) and grouped expert GEMMs (the per-expert path synchronises per layer); a step with a
  // gradient-ready or weights-needed hook set is refused (the graph would run them at capture
  // only). New shapes drop the graphs.
  void set_cuda_graphs(bool enabled);
  bool cuda_graphs() const { return graphs_enabled_; }
  // Graphs captured since construction.
  int64_t graph_captures() const { return graph_captures_; }

  // Per MoE layer statistics of the last forward (aux and z loss, assignments per expert).
  const std::vector<MoeFfnStats>& moe_stats() const { return moe_stats_; }
  // Whether the experts' GEMMs run as grouped GEMMs (else one cuBLASLt call per expert after a
  // host synchronisation per MoE layer).
  bool grouped_expert_gemms() const { return grouped_experts_; }
  // The grouped GEMMs' configuration per product (meaningful when grouped_expert_gemms()).
  const GroupedGemmKernels& grouped_gemm_kernels() const { return grouped_.kernels(); }

  // Forward only, returning the logits [batch * seq, vocab] (fp32, copied out chunk by chunk) and
  // the loss of the given targets in *loss.
  std::vector<float> forward_logits(const int32_t* tokens, const int32_t* targets, int64_t batch,
                                    int64_t seq, LossBreakdown* loss);
  // Router logits [batch * seq, num_experts] of layer l (an MoE layer) in the last forward, as its
  // top-k saw them (fp32 out of the bf16 router GEMM); this rank's tokens under expert or tensor
  // parallelism.
  std::vector<float> router_logits(int64_t l) const;

  PhaseTimer& timer() { return timer_; }

 private:
  struct Layer;
  struct Scratch;

  void resize(int64_t batch, int64_t seq);
  // The gradient ranges no weight-gradient GEMM assigns (norm weights, biases, the embedding, the
  // experts on the per-expert path): zeroed before a kAssign backward.
  void find_accumulated_ranges();
  void find_grad_ready_ranges();
  void grad_ready(size_t index) {
    if (grad_ready_hook_) grad_ready_hook_(index);
  }
  void weights_needed(size_t index) {
    if (weights_needed_hook_) weights_needed_hook_(index);
  }
  // The first num_params elements of a flat buffer, after the stream's work.
  std::vector<float> download_flat(const DeviceBuffer<float>& src) const;
  // Checks the size of a flat [num_params] host array and copies it into dst.
  void upload_flat(DeviceBuffer<float>& dst, const std::vector<float>& host, const char* what);
  // Layer l's attention with its norms: x_in -> ln1 -> x_mid -> ln2; the backward from dres_bf16
  // (and dres) to dres += the gradient through it.
  void attention_forward(int64_t l, int64_t batch, int64_t seq);
  void attention_backward(int64_t l, int64_t batch, int64_t seq);
  // Its part between ln1 and x_mid on one GPU and under sequence parallelism: the q/k/v
  // projections, attention and o_proj with the residual add; the backward from dres_bf16 into dln
  // (assigned).
  void attention_core_forward(int64_t l, int64_t batch, int64_t seq);
  void attention_core_backward(int64_t l, int64_t batch, int64_t seq);
  // Sequence parallelism: the attention core of layer l (q, k, v -> att, lse) over the group's
  // full sequences with this rank's heads, through the Ulysses all-to-alls; and its backward
  // (datt -> dq, dk, dv).
  void ulysses_attention_forward(int64_t l, int64_t batch, int64_t seq);
  void ulysses_attention_backward(int64_t l, int64_t batch, int64_t seq);
  // One all-to-all of the group: local -> heads layout (to_heads) or back
  // (cuda/ulysses_exchange.h).
  void ulysses_exchange(const std::vector<UlyssesTensor>& tensors, bool to_heads, int64_t batch,
                        int64_t seq);
  // The group of GPUs the model runs on (sequence/expert- or tensor-parallel), null on one GPU;
  // its size and this rank's place in it.
  Communicator* group() const { return ep_ != nullptr ? ep_ : tp_; }
  int64_t group_size() const { return group() != nullptr ? group()->size() : 1; }
  int64_t group_rank() const { return group() != nullptr ? group()->rank() : 0; }
  // The group's tokens (this rank's on one GPU): what an MoE layer's losses average over, and what
  // it routes under the all-gather dispatch and tensor parallelism.
  int64_t moe_tokens() const { return n_ * group_size(); }
  // Whether MoE layer l takes the all-to-all dispatch (set_expert_parallel_group), and the tokens
  // it routes: this rank's under the all-to-all dispatch, else moe_tokens().
  bool a2a_layer(int64_t l) const {
    return !a2a_layers_.empty() && a2a_layers_[static_cast<size_t>(l)] != 0;
  }
  int64_t routed_tokens(int64_t l) const { return a2a_layer(l) ? n_ : moe_tokens(); }
  int64_t num_local_experts() const { return config_.num_experts / expert_parallel_size(); }
  int64_t expert_parallel_rank() const { return ep_ != nullptr ? ep_->rank() : 0; }
  // What this rank's attention projects (model/transformer.h's AttentionShard): its n tokens with
  // all heads, or under tensor parallelism the group's full sequences (sequence order, all-gathered
  // into Layer::ln1_group) with its heads.
  struct AttentionShard {
    int64_t rows;  // tokens: n, or batch * n_ranks * seq
    int64_t num_heads, num_kv_heads;
    int64_t q_begin, kv_begin;  // this rank's first column of q_dim and of kv_dim
    const bf16* x;              // [rows, h] the normed input
    const int32_t* positions;   // [rows] RoPE's positions
  };
  AttentionShard attention_shard(int64_t l);
  // The three q/k/v projections of layers that cannot run them packed (model_support.h), and
  // always under tensor parallelism: from shard.x into q, k, v (q_lin, k_lin before a q/k norm),
  // with RoPE. The backward from dq, dk, dv: their weight and bias gradients, and dx [rows, h]
  // (fp32, assigned) = the input gradient.
  void attention_projections_unpacked(int64_t l, const AttentionShard& shard);
  void attention_projections_backward_unpacked(int64_t l, const AttentionShard& shard, float* dx);
  // Where a residual-norm backward also writes its gradient in bf16: the bf16 residual gradient
  // when layer l (the next backward) has a dense FFN, whose first GEMM reads it; else null (an
  // MoE layer reads the fp32 gradient, l < 0 is the embedding).
  bf16* residual_grad_bf16_for(int64_t l);
  // The row ranges of one MoE layer's local experts in the expert-sorted rows: device offsets
  // [experts + 1] (the grouped GEMMs read them there) and their host copy (the per-expert GEMMs'
  // ranges, valid once the stream has passed the copy).
  struct ExpertRows {
    const int32_t* device;
    const int32_t* host;
  };
  // The routed experts of MoE layer l (router, row map, experts) on this rank's tokens, into
  // x_out [n, h], and its aux and z losses into losses [2]: on one GPU and under the all-to-all
  // dispatch x_out = x_mid + their gate-weighted outputs; under the all-gather dispatch
  // moe_group_forward's exchanges write the experts' sum over the group.
  void moe_forward(int64_t l, float* x_out, float* losses);
  void moe_backward(int64_t l, float d_aux, float d_z);
  // Completes x_out [n, h] = x_mid + the gate-weighted expert outputs (adds x_mid under the
  // all-gather dispatch) + the gated shared expert's output.
  void moe_combine(int64_t l, float* x_out);
  // The all-gather dispatch of expert parallelism (gpu_transformer_expert_parallel.cpp). The
  // group's tokens are ordered by chunk, then rank, then token: chunk c holds the tokens
  // [c m, (c + 1) m) of every rank (m = n / chunks), so each chunk's all-gather and reduce-scatter
  // are one collective of contiguous rows. The forward: per chunk an all-gather of ln2 rows
  // (stream_), then on expert_stream_ the router, the local row map, the experts and the combine
  // into group_f32, then its reduce-scatter into x_out (stream_). The backward mirrors it: the
  // experts' input gradient into dln, every rank's gate gradients summed into dgates (moe_backward
  // then runs the router's backward); the experts' weight gradients run last, beside the last
  // chunk's reduce-scatter.
  void moe_group_forward(int64_t l, float* x_out);
  void moe_group_backward(int64_t l);
  // The all-to-all dispatch (gpu_transformer_a2a.cpp; model/moe_dispatch_a2a.h is the spec). The
  // forward: the router on this rank's tokens, the group's counts and router sums, the plan on the
  // host (the layer's one host wait), this rank's kept rows to their experts' ranks, the experts
  // on the rows received, their outputs back, and x_out = x_mid + the gate-weighted outputs; its
  // aux and z losses (the group's) into losses [2]. The backward: the gate gradients into dgates,
  // the output gradients to the experts, their input gradients back, summed per token into dln
  // (assigned), and the experts' weight gradients beside the last exchange.
  void moe_a2a_forward(int64_t l, float* x_out, float* losses);
  void moe_a2a_backward(int64_t l);
  // The host's part of moe_a2a_forward: waits for the routing and the group's counts, plans the
  // layer's exchanges (Layer::a2a_plan) and copies the plan's maps to the device.
  void plan_a2a_layer(int64_t l);
  // The experts' part of chunk c of the tokens the experts see (gpu_transformer_moe.cpp; one
  // chunk of the rank's n tokens on one GPU): from the normed inputs x_tokens [tokens, h] (all
  // chunks'), the router, the row map over this rank's experts, the experts and out [tokens, h]
  // (fp32, assigned) = residual (when not null) + the gate-weighted outputs of this rank's experts.
  void moe_chunk_forward(int64_t l, int64_t chunk, const bf16* x_tokens, float* out,
                         const float* residual, cudaStream_t stream);
  // The backward of chunk c from dout [tokens, h]: its input gradient into dx [tokens, h]
  // (assigned; dx may be dout), the gate gradients into dgates, and its experts' weight gradients
  // (from x_tokens as in the forward), which under expert parallelism run after every chunk's
  // input gradient, beside the exchanges.
  void moe_chunk_backward_input(int64_t l, int64_t chunk, const float* dout, float* dx,
                                cudaStream_t stream);
  void moe_chunk_backward_weight(int64_t l, int64_t chunk, const bf16* x_tokens,
                                 cudaStream_t stream);
  // The local experts of layer l on rows in expert order (both dispatches): at most num_rows rows
  // from row first_row on of the layer's expert buffers, the used ones up to
  // ranges.device[num_local], which the row-wise kernels read on the device. experts_forward:
  // x_rows -> gate and up projections, SwiGLU -> y_rows, which may be x_rows (the gate and up
  // projections are its last readers). experts_backward_input: dy_rows, the gradient of y_rows ->
  // dx_rows (assigned), keeping the projections' gradients in Scratch::dh_gate and dh_up for
  // experts_backward_weight: the experts' weight gradients from them, dy_rows and the inputs
  // x_rows (assigned when assign, else added).
  void experts_forward(int64_t l, const bf16* x_rows, bf16* y_rows, int64_t first_row,
                       int64_t num_rows, const ExpertRows& ranges, cudaStream_t stream);
  void experts_backward_input(int64_t l, bf16* dx_rows, const bf16* dy_rows, int64_t first_row,
                              int64_t num_rows, const ExpertRows& ranges, cudaStream_t stream);
  void experts_backward_weight(int64_t l, const bf16* dy_rows, const bf16* x_rows,
                               int64_t first_row, bool assign, const ExpertRows& ranges,
                               cudaStream_t stream);
  // The chunk count of a forward of n tokens per rank (set_expert_parallel_group's rule).
  int64_t overlap_chunks_for(int64_t n) const;
  // The group tokens of one chunk of the current forward, and chunk c's local expert row ranges
  // in layer l's row map (the plan's expert order under the all-to-all dispatch, one chunk).
  int64_t chunk_tokens() const { return n_ / ep_chunks_ * group_size(); }
  ExpertRows chunk_expert_rows(int64_t l, int64_t chunk) const;
  // An exchange of the group on stream_ that no expert work overlaps (fn enqueues it), charged to
  // the open phase + "_exchange". With the phase timer on (bench train's phase steps) a
  // one-element all-reduce over the group comes first, charged to + "_wait": the time until the
  // slowest rank arrives, so that "_exchange" is the transfer. Every rank of the group must have
  // its timer in the same state (the all-reduce is a collective).
  void exposed_exchange(const std::function<void()>& fn);
  // out [count] = the sum over the expert-parallel group of each rank's part of group [ep, count]
  // for this rank, in the dtype of set_expert_parallel_group's exchange, on stream_.
  void reduce_scatter_group(const float* group, float* out, int64_t count);
  // The shared expert of an MoE layer (Qwen2-MoE): its projections and SwiGLU from ln2 (its
  // sigmoid gate runs in moe_combine); the backward, the gate's included, adds its input gradient
  // to dln (assigned before by the routed experts' backward).
  // Under tensor parallelism on the group's tokens with this rank's slice (moe_tp_forward and
  // moe_tp_backward call them): the forward's output is then a partial sum, its gate's gradient
  // this rank's partial sums over the group's tokens, and the backward reads the group's output
  // gradient (Scratch::group_f32) and adds to the group's input gradient (Scratch::tp_stage_f32).
  void shared_expert_forward(int64_t l);
  void shared_expert_backward(int64_t l);
  // One projection of all experts of a layer (weights [E, out, in], rows grouped by the layer's
  // row map): grouped on the device, or per expert from the host copy of the row offsets.
  void expert_forward(bf16* y, const bf16* x, const bf16* w, int64_t in, int64_t out,
                      const ExpertRows& rows, cudaStream_t stream);
  void expert_backward_input(bf16* dx, const bf16* dy, const bf16* w, int64_t in, int64_t out,
                             bool accumulate, const ExpertRows& rows, cudaStream_t stream);
  // dW of every local expert (assigned when `assign` and the grouped GEMMs run; the per-expert
  // GEMMs accumulate into ranges a kAssign backward zeroed first).
  void expert_backward_weight(float* dw, const bf16* dy, const bf16* x, int64_t in, int64_t out,
                              bool assign, const ExpertRows& rows, cudaStream_t stream);
  // The dense MLP of layer l: x_out [n, h] = x_mid + down(SwiGLU(ln2)) (under tensor
  // parallelism between an all-gather and a reduce-scatter), and its backward (dln assigned).
  void dense_ffn_forward(int64_t l, float* x_out);
  void dense_ffn_backward(int64_t l);
  // One SwiGLU FFN's projections as its GEMMs read them (gate and up [width, h], down [h, width])
  // and their weight gradients. packed_down: ddown is this rank's column slice packed in
  // Scratch::tp_grads (tensor parallelism), assigned whatever the GradMode and added into the
  // flat gradient afterwards (add_ffn_slice_grads).
  struct SwigluWeights {
    const bf16 *gate, *up, *down;
    float *dgate, *dup, *ddown;
    int64_t width;
    bool packed_down;
  };
  // Layer l's dense MLP (shared: its shared expert) as its GEMMs read it: the layer's weights, or
  // under tensor parallelism this rank's slices (gate and up rows in place, down's columns where
  // pack_ffn_slices put them).
  SwigluWeights swiglu_weights(int64_t l, bool shared);
  // The normed input the FFN of layer l reads, and its rows: ln2 of this rank's n tokens, or under
  // tensor parallelism the group's tokens (rank order) in Layer::ln2_group.
  const bf16* ffn_input(int64_t l);
  int64_t ffn_rows() const { return n_ * tensor_parallel_size(); }
  // Every local expert of MoE layer l as the expert GEMMs read them (gate and up [E, f, h], down
  // [E, h, f] for the f = ffn intermediate columns) and their weight gradients: the layer's own,
  // or under tensor parallelism (packed) this rank's slices, packed by pack_ffn_slices into
  // Scratch::tp_weights, their gradients assigned into Scratch::tp_grads and added into the flat
  // gradient by add_ffn_slice_grads.
  struct ExpertWeights {
    const bf16 *gate, *up, *down;
    float *dgate, *dup, *ddown;
    int64_t ffn;
    bool packed;
  };
  ExpertWeights expert_weights(int64_t l);
  // A SwiGLU FFN up to its down projection: gate, up [rows, width] = x [rows, h] times w.gate and
  // w.up; act = SwiGLU(gate, up).
  void swiglu_ffn_forward(const bf16* x, const SwigluWeights& w, int64_t rows, bf16* gate, bf16* up,
                          bf16* act);
  // The backward of a SwiGLU FFN from its input x [rows, h], SwiGLU output act, gate and up
  // projections [rows, width] and the gradient dy [rows, h] (bf16) of its output: the three
  // weight gradients (as the backward's GradMode says, ddown assigned when packed_down) and the
  // input gradient into dx [rows, h] (assigned, or added when add_to_dx). dh_gate and dh_up are
  // its scratch.
  void swiglu_ffn_backward(const bf16* dy, const bf16* x, const bf16* act, const bf16* gate,
                           const bf16* up, const SwigluWeights& w, int64_t rows, float* dx,
                           bool add_to_dx);
  // Tensor parallelism (gpu_transformer_tensor_parallel.cpp). Attention of layer l between its
  // normed input and x_mid: ln1 all-gathered along the sequence, this rank's heads' projections,
  // RoPE and attention over the full sequences, the row-parallel o_proj's partial sums
  // reduce-scattered into x_mid (+ x_in); the backward from dres_bf16 into dln, mirrored.
  void tp_attention_forward(int64_t l, int64_t batch, int64_t seq);
  void tp_attention_backward(int64_t l, int64_t batch, int64_t seq);
  // The MoE layer l on the group's tokens: ln2 all-gathered, the router (the same on every rank),
  // every expert and the shared expert on this rank's columns, their partial sums reduce-scattered
  // into x_out [n, h] (moe_combine adds x_mid); the backward all-gathers the output gradient,
  // reduce-scatters the input gradient into dln and sums the gate gradients over the group
  // (moe_backward then runs the router's backward on them).
  void moe_tp_forward(int64_t l, float* x_out);
  void moe_tp_backward(int64_t l);
  // Exposed exchanges of the group along the sequence (model/tensor_parallel.h's
  // all_gather_sequences and reduce_scatter_sequences): full [batch, n_ranks * seq, h] (sequence
  // order) from every rank's local [batch, seq, h] (bf16), and local [batch, seq, h] (fp32) = this
  // rank's positions of the group's sum of full. Batches of several sequences reorder through
  // Scratch::tp_stage_bf16 / tp_stage_f32.
  void tp_all_gather_sequences(bf16* full, const bf16* local, int64_t batch, int64_t seq);
  void tp_reduce_scatter_sequences(float* local, const float* full, int64_t batch, int64_t seq);
  // The FFN of layer l's exchanges of the group's tokens (rank order): ln2 all-gathered into
  // Layer::ln2_group (bf16), with pack_ffn_slices; out [n, h] (fp32, assigned) = this rank's rows
  // of the group's sum of partial [tp * n, h].
  void tp_gather_ffn_input(int64_t l);
  void tp_reduce_scatter_ffn_output(const float* partial, float* out);
  // The dense MLP's backward: dres_bf16 all-gathered, the slice's backward, the input gradient
  // reduce-scattered into dln.
  void tp_dense_ffn_backward(int64_t l);
  // This rank's slice [r F / n, (r + 1) F / n) of an intermediate size F, as the columns of a down
  // projection [h, F] (begin * h is the offset of the matching rows of gate and up).
  ColumnSlice ffn_slice(int64_t ffn) const;
  // The column slices of layer l's FFN that its GEMMs cannot read in place, packed into
  // Scratch::tp_weights: a dense MLP's down columns, or an MoE layer's experts (gate and up rows
  // of every expert, [E, F, h] each, then down's columns [E, h, F]) and its shared expert's down
  // columns after them. add_ffn_slice_grads adds their gradients (Scratch::tp_grads, the same
  // places) into the flat gradient.
  void pack_ffn_slices(int64_t l);
  void add_ffn_slice_grads(int64_t l);
  // Where pack_ffn_slices puts an MoE layer's shared expert's down columns (after the experts').
  int64_t shared_down_slice_at() const;
  // The LM head and the cross-entropy in chunks, scaled by Scratch::dce.
  void head_forward_backward(bool backward);
  // What a captured graph depends on besides device memory.
  struct StepKey {
    int64_t batch, seq;
    double dloss;
    bool accumulate;
    bool operator==(const StepKey& o) const {
      return batch == o.batch && seq == o.seq && dloss == o.dloss && accumulate == o.accumulate;
    }
  };
  // The device work of forward_backward, from the uploaded inputs to the loss sums.
  void enqueue_forward_backward(const StepKey& key);
  // Runs enqueue as key's ReplayedWork (eagerly, captured or replayed).
  void replay_or_capture(const StepKey& key, const std::function<void()>& enqueue);
  // Selective recompute: rebuilds the layer's normed inputs and SwiGLU output before its backward.
  void recompute_ffn_inputs(int64_t l);
  void recompute_attention_inputs(int64_t l);
  const float* w(int64_t offset) const { return offset < 0 ? nullptr : params_.data() + offset; }
  const bf16* wb(int64_t offset) const {
    return offset < 0 ? nullptr : params_bf16_.data() + offset;
  }
  float* g(int64_t offset) { return offset < 0 ? nullptr : grads_.data() + offset; }

  ModelConfig config_;
  ParameterLayout layout_;
  Recompute recompute_;
  cudaStream_t stream_ = nullptr;
  // Checked before the cuBLAS and cuDNN handles below are created, for a clear error.
  bool has_device_ = (require_cuda_device(), true);
  Blas blas_;
  Attention attention_;
  GroupedGemm grouped_;
  bool grouped_experts_ = false;  // the experts' GEMMs run grouped (no host synchronisation)
  PhaseTimer timer_;
  DeviceBuffer<float> params_, grads_;
  DeviceBuffer<bf16> params_bf16_;
  DeviceBuffer<float> rope_cos_, rope_sin_;

  int64_t batch_ = 0, seq_ = 0, n_ = 0;
  int64_t num_moe_layers_ = 0;
  std::vector<Layer> layers_;
  std::vector<MoeFfnStats> moe_stats_;
  float* host_logits_ = nullptr;  // set by forward_logits: where the head copies its logits
  bool accumulate_grads_ = true;  // the current backward's GradMode
  Communicator* ep_ = nullptr;    // the sequence/expert-parallel group (device buffers), or null
  Communicator* tp_ = nullptr;    // the tensor-parallel group (device buffers), or null
  GradReduceDtype ep_exchange_ = GradReduceDtype::kFloat32;  // set_expert_parallel_group's
  int64_t ep_chunks_requested_ = 1;  // set_expert_parallel_group's overlap_chunks, resolved
  int64_t ep_chunks_ = 1;            // the current forward's
  // Per decoder layer: 1 where an MoE layer takes the all-to-all dispatch; empty on one GPU.
  std::vector<uint8_t> a2a_layers_;
  // The experts' stream under expert parallelism (created with the group) and the events that
  // order it with stream_.
  cudaStream_t expert_stream_ = nullptr;
  EventPool events_;
  DeviceGradReducer ep_reducer_;  // the bf16 reduce-scatters of the MoE exchanges
  std::vector<std::pair<int64_t, int64_t>> accumulated_ranges_;  // (offset, count)
  std::vector<GradRange> grad_ready_ranges_;
  std::function<void(size_t)> grad_ready_hook_, weights_needed_hook_;
  std::unique_ptr<Scratch> scratch_;
  bool graphs_enabled_ = false;
  std::vector<std::pair<StepKey, ReplayedWork>> graphs_;  // since the last new shape
  int64_t graph_captures_ = 0;
};

}  // namespace moeforge::cuda
