// The MoE FFN layer (forward and backward by hand), laid out for expert parallelism as in
// MegaScale-MoE: all-gather tokens over the expert-parallel group -> route -> scatter the rows of
// local experts by a row map -> grouped GEMMs (gate, up) -> SwiGLU -> grouped GEMM (down) ->
// gather weighted by the gates -> reduce-scatter back to the local tokens. With one rank the
// collectives are copies. An optional shared expert (Qwen2-MoE) runs densely on the local tokens,
// scaled by sigmoid(x . shared_expert_gate).
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "model/dense_ffn.h"
#include "ops/row_map.h"

namespace moeforge {

struct MoeFfnDims {
  int64_t num_tokens;  // local tokens (this rank's shard)
  int64_t hidden;
  int64_t expert_ffn;   // moe_intermediate_size
  int64_t num_experts;  // global
  int64_t top_k;
  bool norm_topk_prob;
  double capacity_factor;  // <= 0: dropless
  int64_t shared_ffn;      // 0: no shared expert
};

template <typename T>
struct MoeFfnWeights {
  const T* router;              // [num_experts, hidden] (replicated)
  const T* gate_proj;           // [local_experts, expert_ffn, hidden]
  const T* up_proj;             // [local_experts, expert_ffn, hidden]
  const T* down_proj;           // [local_experts, hidden, expert_ffn]
  const T* shared_gate_proj;    // [shared_ffn, hidden] or null
  const T* shared_up_proj;      // [shared_ffn, hidden] or null
  const T* shared_down_proj;    // [hidden, shared_ffn] or null
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

// What the forward saves for the backward (owned buffers, reused across steps).
template <typename T>
struct MoeFfnSaved {
  std::vector<T> tokens;            // [group_tokens, hidden] all-gathered input
  std::vector<T> logits;            // [group_tokens, num_experts]
  std::vector<T> probs;             // [group_tokens, num_experts]
  std::vector<int32_t> expert_idx;  // [group_tokens, top_k]
  std::vector<T> gates;             // [group_tokens, top_k]
  ops::RowMap row_map;
  std::vector<T> rows;          // [num_rows, hidden]
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
  double aux_loss = 0.0;             // router_aux_loss over the group's tokens
  double z_loss = 0.0;               // router_z_loss over the group's tokens
  std::vector<int64_t> expert_load;  // [num_experts] assignments routed to each expert
  int64_t num_dropped = 0;           // assignments dropped by capacity (local experts)
};

// out [num_tokens, hidden] (assign). inp [num_tokens, hidden]. ep: the expert-parallel group;
// experts are split evenly over its ranks in rank order.
template <typename T>
void moe_ffn_forward(T* out, MoeFfnSaved<T>& saved, MoeFfnStats& stats, const T* inp,
                     const MoeFfnWeights<T>& weights, const MoeFfnDims& dims, Communicator& ep);

// dinp [num_tokens, hidden] (assign). d_aux, d_z: gradient of the final loss with respect to this
// layer's aux loss and z-loss.
template <typename T>
void moe_ffn_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dout, const T* inp,
                      const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                      const MoeFfnDims& dims, double d_aux, double d_z, Communicator& ep);

}  // namespace moeforge
