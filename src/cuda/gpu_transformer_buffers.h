// The device buffers of GpuTransformer (cuda/gpu_transformer.h): what each layer's forward saves
// for its backward, and the scratch reused across layers and steps. Private to the
// gpu_transformer*.cpp files that implement the class.
#pragma once

#include <cstdint>

#include "cuda/bf16.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_transformer.h"
#include "cuda/moe_dispatch_a2a.h"
#include "model/moe_dispatch_a2a.h"

namespace moeforge::cuda {

// What the forward of one layer saves for its backward.
struct GpuTransformer::Layer {
  // ln1, ln2, h_act and shared_act live in the buffers below (kNone) or in shared scratch
  // (kSelective); these point at whichever holds them. The expert-sorted copy of ln2 is never
  // kept: it lives in Scratch::rows, and the backward gathers it again (a copy, no arithmetic).
  bf16 *ln1_ptr = nullptr, *ln2_ptr = nullptr, *h_act_ptr = nullptr, *shared_act_ptr = nullptr;
  DeviceBuffer<float> x_in;            // [n, h] residual stream entering the layer
  DeviceBuffer<bf16> ln1;              // [n, h]
  DeviceBuffer<float> rstd1;           // [n]
  DeviceBuffer<bf16> q_lin, k_lin;     // [n, qd], [n, kvd] before q/k norm (qk_norm only)
  DeviceBuffer<float> rstd_q, rstd_k;  // [n * heads], [n * kv_heads]
  DeviceBuffer<bf16> q, k, v;          // after norm and RoPE
  DeviceBuffer<bf16> att;              // [n, qd]
  DeviceBuffer<float> lse;             // [batch, heads, seq]
  DeviceBuffer<float> x_mid;           // [n, h] after attention
  DeviceBuffer<bf16> ln2;              // [n, h]
  DeviceBuffer<float> rstd2;           // [n]
  // MoE. Under the all-gather dispatch n is the group's tokens (in moe_group_forward's chunk
  // order) and the row map has one set of offsets per chunk: [chunks, local experts + 1]; under
  // the all-to-all dispatch n is this rank's tokens for the router's buffers, and the rows of the
  // experts' buffers (h_gate, ...) are the ones received, at most the group's tokens * k.
  DeviceBuffer<float> router_logits, probs;         // [n, E]
  DeviceBuffer<int32_t> expert_idx;                 // [n, k]
  DeviceBuffer<float> gates;                        // [n, k]
  DeviceBuffer<int32_t> expert_counts;              // [E] assignments routed to each expert
  PinnedHostBuffer<int32_t> host_counts;            // [E], copied without blocking
  DeviceBuffer<int32_t> expert_offsets;             // [E + 1] the kept rows' ranges
  PinnedHostBuffer<int32_t> host_offsets;           // [E + 1], copied without blocking
  DeviceBuffer<int32_t> assignment_row, row_token;  // [n * k]
  DeviceBuffer<bf16> h_gate, h_up, h_act;           // [n * k, f] (dense: [n, ffn])
  DeviceBuffer<bf16> y_rows;                        // [n * k, h]
  // The shared expert (Qwen2-MoE; S = shared_expert_intermediate_size): its gate and up
  // projections and SwiGLU output, its output before the sigmoid gate, and the gate's scores.
  DeviceBuffer<bf16> shared_gate, shared_up, shared_act;  // [n, S]
  DeviceBuffer<bf16> shared_out;                          // [n, h]
  DeviceBuffer<float> shared_score;                       // [n]
  // Sequence parallelism (set_expert_parallel_group): q, k, v and the attention output of this
  // rank's heads over the group's full sequences ([batch, ep * seq, heads / ep, d]); lse holds
  // their log-sum-exp then.
  DeviceBuffer<bf16> q_heads, k_heads, v_heads, att_heads;
  // Expert parallelism: the group's normed MoE inputs [ep * n, h] (the rows of the local experts
  // come from them, forward and backward) and each assignment's local expert or -1 [ep * n * k].
  // Tensor parallelism: the group's normed inputs of attention [batch, tp * seq, h] (sequence
  // order) and of the FFN [tp * n, h] (rank order), which the projections read forward and
  // backward (kept in both recompute modes); q ... att, lse then hold this rank's heads over the
  // group's full sequences ([batch, tp * seq, heads / tp, d]: as many elements as [n, heads, d]),
  // the FFN's buffers (router, rows, h_gate ...; shared_*) the group's tokens with this rank's
  // columns.
  DeviceBuffer<bf16> ln1_group;
  DeviceBuffer<bf16> ln2_group;
  DeviceBuffer<int32_t> local_idx;
  // The all-to-all dispatch: the plan of the last forward (host) and its maps on the device (in
  // a2a_maps_buffer), the rows this rank's experts received (receive order, [ep * n * k, h] at
  // most: the backward rebuilds the experts' inputs from them) and the experts' outputs returned
  // for this rank's assignments (send order, [n * k, h] at most: the combine's backward reads
  // them). expert_counts and expert_offsets stay unused: the maps hold the group's counts and the
  // local experts' row ranges; host_counts and host_offsets get them from the plan.
  A2aDispatchPlan a2a_plan;
  DeviceBuffer<int32_t> a2a_maps_buffer;
  A2aDeviceMaps a2a_maps;
  DeviceBuffer<bf16> a2a_received, a2a_returned;
};

// Buffers reused across layers and steps.
struct GpuTransformer::Scratch {
  DeviceBuffer<bf16> ln1, ln2, h_act, shared_act;  // kSelective: shared by all layers
  DeviceBuffer<bf16> rows;  // [n * k, h] the MoE layer's input in expert order
  // The row map's scratch (row_map_scratch_ints), one for every map of every layer and chunk: all
  // of them run on one stream (stream_, or expert_stream_ under expert parallelism, where the
  // chunks of a forward are enqueued at once but run in turn), and a stream runs its kernels in
  // order, so a map's kernels are done with it before the next map's start. Maps built on two
  // streams at once would need one each.
  DeviceBuffer<int32_t> row_map;
  DeviceBuffer<int32_t> tokens, targets, positions;
  // The embedding backward's token groups, padded to n groups (pad_token_groups).
  DeviceBuffer<int32_t> group_ids, group_offsets, group_positions;
  DeviceBuffer<float> dce;     // [1] the cross-entropy gradient's scale, dloss / counted targets
  DeviceBuffer<float> x_out;   // [n, h] final residual stream
  DeviceBuffer<bf16> lnf;      // [n, h]
  DeviceBuffer<float> rstdf;   // [n]
  DeviceBuffer<float> logits;  // [chunk, vocab]
  DeviceBuffer<bf16> dlogits;  // [chunk, vocab]
  DeviceBuffer<float> losses;  // [n]
  DeviceBuffer<float> router_losses;  // [num_moe_layers, 2]
  DeviceBuffer<float> router_scratch;
  DeviceBuffer<double> sums, sum_scratch;  // [1]
  DeviceBuffer<float> dres, dln;           // [n, h]
  DeviceBuffer<bf16> dres_bf16;            // [n, h]
  DeviceBuffer<bf16> datt, dq, dk, dv, dq_lin, dk_lin;
  // [n, q_dim + 2 kv_dim]: the packed q/k/v projection (forward) and its gradient (backward) of
  // layers whose projections run as one GEMM (packed_qkv).
  DeviceBuffer<bf16> qkv;
  // [n * k, h]: the gradient of the expert outputs, then (reused) of the expert inputs
  DeviceBuffer<bf16> drows;
  DeviceBuffer<float> dgates;         // [n, k]
  DeviceBuffer<float> shared_dlogit;  // [n] gradient of the shared expert gate's logits
  // [n * k, f]: dh_gate holds the gradient of the SwiGLU output first; swiglu_backward replaces it
  // in place by the gradient of the gate projection.
  DeviceBuffer<bf16> dh_gate, dh_up;
  DeviceBuffer<bf16> drouter;  // [n, E]
  // Sequence parallelism: the all-to-all buffers [ep, chunk] and the heads-layout gradients.
  DeviceBuffer<bf16> exchange_send, exchange_recv, datt_heads, dq_heads, dk_heads, dv_heads;
  // Expert parallelism, [ep * n, h]: the combined expert outputs of the group's tokens before the
  // reduce-scatter (forward); the gathered output gradient, then the group's input gradient
  // before the reduce-scatter (backward).
  DeviceBuffer<float> group_f32;
  // bf16 exchanges: [ep * n + n, h], the gathered output gradient in bf16, then this rank's.
  DeviceBuffer<bf16> group_bf16;
  // The all-to-all dispatch, for every layer that takes it: this rank's rows in send order
  // ([n * k, h]: the normed inputs forward, the output and then the input gradients backward) and
  // the rows in receive order ([ep * n * k, h]: the experts' outputs forward, the gradients
  // backward); the group's per-expert counts [ep, E] and router sums [E + 1]; pinned host memory
  // for the routing and the counts [n * k + ep * E] on their way to the plan, and for the maps on
  // their way to the device (the staging: the host writes it only after a synchronisation of the
  // stream, which has then passed the last copy out of it).
  DeviceBuffer<bf16> a2a_send, a2a_recv;
  DeviceBuffer<int32_t> a2a_loads;
  DeviceBuffer<float> a2a_sums;
  PinnedHostBuffer<int32_t> a2a_routing, a2a_staging;
  // Tensor parallelism: RoPE's positions of the group's full sequences [batch, tp * seq]; the
  // staging of the reorders between rank and sequence order ([tp * n, h]; bf16 only for batches
  // of several sequences), fp32 also the group's input gradient of an FFN; this rank's column
  // slices of a layer's weights that the GEMMs cannot read in place, packed (pack_ffn_slices and
  // o_proj's), and their gradients (the largest layer's). group_f32 holds the row-parallel GEMMs'
  // partial sums and the gathered fp32 output gradients, group_bf16 the gathered bf16 ones.
  DeviceBuffer<int32_t> tp_positions;
  DeviceBuffer<bf16> tp_stage_bf16;
  DeviceBuffer<float> tp_stage_f32;
  DeviceBuffer<bf16> tp_weights;
  DeviceBuffer<float> tp_grads;
  DeviceBuffer<int64_t> counted;    // [1] the group's counted targets
  DeviceBuffer<int32_t> wait_word;  // [1] zero: exposed_exchange's wait all-reduce
};

}  // namespace moeforge::cuda
