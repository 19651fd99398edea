// The MoE FFN layer (forward and backward by hand), laid out for expert parallelism as in
// MegaScale-MoE, with two ways for the tokens to reach the experts of other ranks (EpDispatch):
// - all-gather: all-gather tokens over the expert-parallel group -> route -> scatter the rows of
//   local experts by a row map -> grouped GEMMs (gate, up) -> SwiGLU -> grouped GEMM (down) ->
//   gather weighted by the gates -> reduce-scatter back to the local tokens;
// - all-to-all: route the local tokens -> send each (token, slot) row to the rank owning its
//   expert -> the same grouped GEMMs there -> send the outputs back -> gather weighted by the
//   gates (moe_dispatch_a2a.h).
// Both give the same outputs, losses, statistics and gradients (to rounding; the experts see the
// same rows in the same order). With one rank the collectives are copies. An optional shared
// expert (Qwen2-MoE) runs densely on the local tokens, scaled by sigmoid(x . shared_expert_gate).
// Under tensor parallelism (ParallelLayout::kTensor, the Megatron baseline;
// model/tensor_parallel.h) the tokens take the all-gather path, but every rank runs every expert,
// and the shared expert on the group's tokens, on its slice of the intermediate dimension; the
// reduce-scatter sums the partial outputs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/dense_ffn.h"
#include "model/moe_dispatch_a2a.h"
#include "model/tensor_parallel.h"
#include "ops/row_map.h"

namespace moeforge {

// How the routed tokens reach the experts (the training config's parallel.ep_dispatch).
enum class EpDispatch {
  kAllGather,  // all-gather -> local experts -> reduce-scatter
  kAllToAll,   // each assignment's row to its expert's rank and back
  kAuto,       // choose_ep_dispatch's rule on top_k and the group size
};

// "allgather", "alltoall" or "auto"; throws naming the accepted values otherwise.
EpDispatch parse_ep_dispatch(const std::string& name);
std::string ep_dispatch_name(EpDispatch dispatch);
// The variant that runs: dispatch itself unless kAuto; for kAuto the one that moves less data
// per layer, all-to-all iff top_k < num_ranks (derivation in moe_ffn.cpp; ties to all-gather,
// whose ring collectives beat an all-to-all of the same volume).
EpDispatch choose_ep_dispatch(EpDispatch dispatch, int64_t top_k, int64_t num_ranks);

// The dispatch of each decoder layer's MoE: one for every layer, or one per decoder layer (the
// entries of dense layers are unused).
class EpDispatchPlan {
 public:
  // Implicit: a single dispatch is the plan of every layer.
  EpDispatchPlan(EpDispatch every_layer = EpDispatch::kAuto)  // NOLINT(google-explicit-constructor)
      : per_layer_{every_layer} {}
  // Throws when per_layer is empty.
  explicit EpDispatchPlan(std::vector<EpDispatch> per_layer);

  EpDispatch layer(int64_t l) const;
  // Whether some layer's entry is `dispatch`.
  bool uses(EpDispatch dispatch) const;
  // 1 (every layer) or the number of decoder layers.
  size_t size() const { return per_layer_.size(); }

 private:
  std::vector<EpDispatch> per_layer_;
};

// The comma-separated names of parse_ep_dispatch in text (one without a comma); throws naming a
// bad entry.
std::vector<EpDispatch> parse_ep_dispatch_list(const std::string& text);
// One name of parse_ep_dispatch for every layer, or a comma-separated list of them with one per
// decoder layer (num_layers entries); throws naming the problem otherwise.
EpDispatchPlan parse_ep_dispatch_plan(const std::string& text, int64_t num_layers);
// The dispatches the decoder layers run, as the trainer and bench train report them: the one name
// when every MoE layer runs the same, else one per decoder layer, comma-separated, "dense" for the
// layers without experts (nullopt in per_layer).
std::string describe_ep_dispatch(const std::vector<std::optional<EpDispatch>>& per_layer);

struct MoeFfnDims {
  int64_t num_tokens;  // local tokens (this rank's shard)
  int64_t hidden;
  int64_t expert_ffn;   // moe_intermediate_size
  int64_t num_experts;  // global
  int64_t top_k;
  bool norm_topk_prob;
  double capacity_factor;                   // <= 0: dropless
  int64_t shared_ffn;                       // 0: no shared expert
  int64_t balance_groups = 0;               // of the aux loss (ops/router.h); 0: per expert
  EpDispatch dispatch = EpDispatch::kAuto;  // kSequenceExpert only
  // kTensor: expert_ffn and shared_ffn must be divisible by the group size.
  ParallelLayout layout = ParallelLayout::kSequenceExpert;
};

// The weights a rank passes: under kSequenceExpert its local experts' blocks and the whole shared
// expert; under kTensor (rank r of n, F = expert_ffn / n, S = shared_ffn / n) its slices, packed:
// rows [r F, (r + 1) F) of every expert's gate and up, the same columns of every expert's down,
// rows [r S, (r + 1) S) of the shared gate and up and those columns of the shared down. The
// router and the shared expert gate are whole (replicated) in both.

template <typename T>
struct MoeFfnWeights {
  const T* router;              // [num_experts, hidden] (replicated)
  const T* gate_proj;           // [local_experts, expert_ffn, hidden]; kTensor [experts, F, hidden]
  const T* up_proj;             // [local_experts, expert_ffn, hidden]; kTensor [experts, F, hidden]
  const T* down_proj;           // [local_experts, hidden, expert_ffn]; kTensor [experts, hidden, F]
  const T* shared_gate_proj;    // [shared_ffn, hidden] or null; kTensor [S, hidden]
  const T* shared_up_proj;      // [shared_ffn, hidden] or null; kTensor [S, hidden]
  const T* shared_down_proj;    // [hidden, shared_ffn] or null; kTensor [hidden, S]
  const T* shared_expert_gate;  // [1, hidden] or null
};

// Same layout as MoeFfnWeights; every gradient accumulates (+=).
template <typename T>
struct MoeFfnGrads {
  T* router;
  T* gate_proj;
  T* up_proj;
  T* down_proj;
  T* shared_gate_proj;
  T* shared_up_proj;
  T* shared_down_proj;
  T* shared_expert_gate;
};

// What the forward saves for the backward (owned buffers, reused across steps). The routed tokens
// are the group's (all-gather, tensor parallel) or this rank's own (all-to-all); the rows are the
// local experts' (all experts' under tensor parallelism), in the same order in both dispatches.
template <typename T>
struct MoeFfnSaved {
  EpDispatch dispatch = EpDispatch::kAllGather;  // the variant that ran
  std::vector<T> tokens;            // all-gather, tp: [group_tokens, hidden] all-gathered input
  std::vector<T> logits;            // [routed_tokens, num_experts]
  std::vector<T> probs;             // [routed_tokens, num_experts]
  std::vector<int32_t> expert_idx;  // [routed_tokens, top_k]
  std::vector<T> gates;             // [routed_tokens, top_k]
  ops::RowMap row_map;              // all-gather: the group's tokens to the local experts' rows
  A2aDispatchPlan a2a;              // all-to-all: the exchanges (its recv_map orders the rows)
  std::vector<T> returned;  // all-to-all: [a2a.send_map rows, hidden] expert outputs received
  std::vector<T> rows;      // [num_rows, hidden]
  // Under tp: expert_ffn -> F columns, shared_ffn -> S columns, num_tokens -> group_tokens (the
  // shared expert's), y_rows and shared_out partial sums.
  std::vector<T> h_gate;        // [num_rows, expert_ffn]
  std::vector<T> h_up;          // [num_rows, expert_ffn]
  std::vector<T> h_act;         // [num_rows, expert_ffn]
  std::vector<T> y_rows;        // [num_rows, hidden] down-projected rows (before gate weight)
  DenseFfnSaved<T> shared;      // shared expert activations [num_tokens, shared_ffn]
  std::vector<T> shared_out;    // [num_tokens, hidden] shared expert output before its gate
  std::vector<T> shared_score;  // [num_tokens] sigmoid gate value
};

// Per-layer statistics of one forward.
struct MoeFfnStats {
  EpDispatch dispatch = EpDispatch::kAllGather;  // the variant that ran (kAllGather under tp)
  double aux_loss = 0.0;                         // router_aux_loss over the group's tokens
  double z_loss = 0.0;                           // router_z_loss over the group's tokens
  std::vector<int64_t> expert_load;              // [num_experts] assignments routed to each expert
  int64_t num_dropped = 0;  // assignments dropped by capacity (local experts; all under tp)
};

// out [num_tokens, hidden] (assign). inp [num_tokens, hidden]. ep: the expert-parallel group;
// experts are split evenly over its ranks in rank order (under kTensor: the tensor-parallel group,
// intermediate columns split evenly). dims.dispatch picks the variant (choose_ep_dispatch); every
// rank of the group must pass the same dims.
template <typename T>
void moe_ffn_forward(T* out, MoeFfnSaved<T>& saved, MoeFfnStats& stats, const T* inp,
                     const MoeFfnWeights<T>& weights, const MoeFfnDims& dims, Communicator& ep);

// dinp [num_tokens, hidden] (assign). d_aux, d_z: gradient of the final loss with respect to this
// layer's aux loss and z-loss. dims must choose the variant that the forward ran (checked).
template <typename T>
void moe_ffn_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dout, const T* inp,
                      const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                      const MoeFfnDims& dims, double d_aux, double d_z, Communicator& ep);

}  // namespace moeforge
