// MoE FFN layer forward and backward by hand, in MegaScale-MoE's two expert-parallel layouts
// (all-gather / scatter / grouped GEMM / gather / reduce-scatter, and the all-to-all dispatch of
// moe_dispatch_a2a.h), plus the optional sigmoid-gated shared expert.
//
// Router gradient under expert parallelism. The router weight is replicated over the ep group.
// All-gather: every rank routes all the group's tokens identically. The gate gradients of a token
// are split over the ranks that own its experts (each entry is non-zero on at most one rank), so
// they are summed by an all-reduce, which is exact; every rank then runs router_backward over the
// whole group (the aux and z terms are defined over the group) and gets identical logit gradients,
// of which it keeps the rows of its own local tokens. All-to-all: each rank routes only its own
// tokens and gets their gate gradients locally (it combines the returned expert outputs itself);
// the aux and z terms use the group's assignment counts and token count from the plan, so its
// logit gradients equal the all-gather path's rows of its tokens. Either way each rank adds
// dlogits[local]^T @ inp to grads.router and dlogits[local] @ router to dinp. grads.router on one
// rank is therefore the partial gradient of its token shard, like any replicated weight under
// sequence parallelism: the caller must sum grads.router over the ep group (with the other
// replicated weights). With one rank it is the full gradient and nothing needs summing.
//
// Tensor parallelism (dims.layout kTensor, model/tensor_parallel.h) runs the all-gather path with
// every expert on every rank, each on its slice of the intermediate columns, so the rows' outputs
// y_rows are partial sums over the ranks and so are the gate gradients dout . y_rows: their
// all-reduce is their sum. The router then runs as above: identical logit gradients on every
// rank, of which each keeps its own tokens' rows. The group's sum of grads.router therefore adds
// every token's contribution exactly once (the single-rank sum split by rows; dividing n
// identical full gradients by n before the sum would add roundings for n > 2). The shared
// expert runs on the group's tokens on its slice and joins the reduce-scatter; its gate scores'
// gradients (partial sums like dgates) are all-reduced, and the gate's weight and input gradients
// are taken on the local tokens only, like the router's.
//
// Communication volume per layer and rank (elements; megascale-moe.md section 1, with the group's
// b * s tokens split into n shards of N = b * s / n tokens of hidden size h, top-k k):
// - all-gather: the all-gather brings the other ranks' (n - 1) N rows and the reduce-scatter
//   sends (n - 1) N partial rows: 2 (n - 1) N h = 2 b s h (n - 1) / n, every token crossing to
//   each of the n - 1 other ranks once each way. The backward moves the same (all-gather of dout,
//   reduce-scatter of dinp) plus an all-reduce of the b * s * k gate gradients.
// - all-to-all: each of the N k assignments of a rank goes to its expert's rank, another rank for
//   (n - 1) / n of them with balanced routing, and its output comes back: 2 N k h (n - 1) / n =
//   2 k / n * b s h (n - 1) / n. The backward moves the same (output gradients out, input
//   gradients back); the plan adds an all-gather of n * num_experts counts and an all-reduce of
//   num_experts + 1 router sums, independent of h.
// Per token the all-to-all moves k (n - 1) / n rows each way and the all-gather n - 1, so "auto"
// takes the all-to-all iff k (n - 1) / n < n - 1, i.e. k < n for n > 1 (a ratio of k / n). At
// equal volume (k = n) and for n = 1 it keeps the all-gather, whose ring collectives run faster
// than an all-to-all of the same size (the paper measured the all-gather ahead on Mixtral-8x7B
// with n = 8 already for top-k > 6). Token dropping only lowers the all-to-all's volume: dropped
// rows are not sent.
#include "model/moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "core/error.h"
#include "model/dense_ffn.h"
#include "ops/grouped_linear.h"
#include "ops/linear.h"
#include "ops/permute.h"
#include "ops/router.h"
#include "ops/swiglu.h"

namespace moeforge {

EpDispatch parse_ep_dispatch(const std::string& name) {
  if (name == "allgather") return EpDispatch::kAllGather;
  if (name == "alltoall") return EpDispatch::kAllToAll;
  if (name == "auto") return EpDispatch::kAuto;
  MF_FAIL("unknown expert-parallel dispatch \"{}\": use \"allgather\", \"alltoall\" or \"auto\"",
          name);
}

std::string ep_dispatch_name(EpDispatch dispatch) {
  switch (dispatch) {
    case EpDispatch::kAllGather: return "allgather";
    case EpDispatch::kAllToAll: return "alltoall";
    case EpDispatch::kAuto: return "auto";
  }
  MF_FAIL("unknown EpDispatch {}", static_cast<int>(dispatch));
}

EpDispatch choose_ep_dispatch(EpDispatch dispatch, int64_t top_k, int64_t num_ranks) {
  if (dispatch != EpDispatch::kAuto) return dispatch;
  // k (n - 1) / n < n - 1, multiplied by n (see the top of the file).
  return top_k * (num_ranks - 1) < num_ranks * (num_ranks - 1) ? EpDispatch::kAllToAll
                                                               : EpDispatch::kAllGather;
}

EpDispatchPlan::EpDispatchPlan(std::vector<EpDispatch> per_layer)
    : per_layer_(std::move(per_layer)) {
  MF_CHECK(!per_layer_.empty(), "an expert dispatch plan needs at least one entry");
}

EpDispatch EpDispatchPlan::layer(int64_t l) const {
  if (per_layer_.size() == 1) return per_layer_[0];
  MF_CHECK(l >= 0 && l < static_cast<int64_t>(per_layer_.size()),
           "layer {} is outside the expert dispatch plan of {} layers", l, per_layer_.size());
  return per_layer_[static_cast<size_t>(l)];
}

bool EpDispatchPlan::uses(EpDispatch dispatch) const {
  return std::find(per_layer_.begin(), per_layer_.end(), dispatch) != per_layer_.end();
}

std::vector<EpDispatch> parse_ep_dispatch_list(const std::string& text) {
  std::vector<EpDispatch> list;
  for (size_t begin = 0;;) {
    const size_t end = text.find(',', begin);
    list.push_back(parse_ep_dispatch(text.substr(begin, end - begin)));
    if (end == std::string::npos) return list;
    begin = end + 1;
  }
}

EpDispatchPlan parse_ep_dispatch_plan(const std::string& text, int64_t num_layers) {
  std::vector<EpDispatch> per_layer = parse_ep_dispatch_list(text);
  if (per_layer.size() == 1) return EpDispatchPlan(per_layer[0]);
  MF_CHECK(static_cast<int64_t>(per_layer.size()) == num_layers,
           "the expert dispatch list \"{}\" has {} entries for a model of {} decoder layers (one "
           "name for every layer, or one per layer)",
           text, per_layer.size(), num_layers);
  return EpDispatchPlan(std::move(per_layer));
}

std::string describe_ep_dispatch(const std::vector<std::optional<EpDispatch>>& per_layer) {
  std::string listed, first_moe;
  bool uniform = true;
  for (size_t l = 0; l < per_layer.size(); ++l) {
    const std::string run = per_layer[l] ? ep_dispatch_name(*per_layer[l]) : "dense";
    if (per_layer[l]) {
      if (first_moe.empty()) first_moe = run;
      uniform = uniform && run == first_moe;
    }
    listed += (l == 0 ? "" : ",") + run;
  }
  return uniform ? first_moe : listed;
}

namespace {

// Sizes that follow from the dims and the group.
struct EpLayout {
  int64_t rank;
  int64_t num_ranks;
  int64_t group_tokens;  // num_tokens * num_ranks
  int64_t num_local_experts;
  int64_t expert_begin;
  EpDispatch dispatch;   // kAllGather or kAllToAll (kAllGather under tp)
  bool tensor_parallel;  // dims.layout is kTensor
  int64_t expert_ffn;    // intermediate columns of each local expert here (a 1 / n slice under tp)
  int64_t shared_ffn;    // those of the shared expert (likewise)
};

EpLayout make_layout(const MoeFfnDims& dims, const Communicator& ep) {
  MF_CHECK(dims.num_tokens >= 0 && dims.hidden >= 1 && dims.expert_ffn >= 1,
           "moe_ffn: invalid dims num_tokens {}, hidden {}, expert_ffn {}", dims.num_tokens,
           dims.hidden, dims.expert_ffn);
  MF_CHECK(dims.num_experts >= 1 && dims.top_k >= 1 && dims.top_k <= dims.num_experts,
           "moe_ffn: top_k ({}) must be in [1, num_experts = {}]", dims.top_k, dims.num_experts);
  MF_CHECK(dims.shared_ffn >= 0, "moe_ffn: shared_ffn ({}) must be >= 0", dims.shared_ffn);
  EpLayout layout;
  layout.rank = ep.rank();
  layout.num_ranks = ep.size();
  layout.group_tokens = dims.num_tokens * layout.num_ranks;
  layout.tensor_parallel = dims.layout == ParallelLayout::kTensor;
  if (layout.tensor_parallel) {
    MF_CHECK(dims.expert_ffn % layout.num_ranks == 0 && dims.shared_ffn % layout.num_ranks == 0,
             "moe_ffn: tensor parallelism over {} ranks needs expert_ffn ({}) and shared_ffn ({}) "
             "divisible by the group size",
             layout.num_ranks, dims.expert_ffn, dims.shared_ffn);
    layout.num_local_experts = dims.num_experts;
    layout.expert_begin = 0;
    layout.dispatch = EpDispatch::kAllGather;
    layout.expert_ffn = dims.expert_ffn / layout.num_ranks;
    layout.shared_ffn = dims.shared_ffn / layout.num_ranks;
    return layout;
  }
  MF_CHECK(dims.num_experts % layout.num_ranks == 0,
           "moe_ffn: num_experts ({}) must be divisible by the expert-parallel size ({})",
           dims.num_experts, layout.num_ranks);
  layout.num_local_experts = dims.num_experts / layout.num_ranks;
  layout.expert_begin = layout.rank * layout.num_local_experts;
  layout.dispatch = choose_ep_dispatch(dims.dispatch, dims.top_k, layout.num_ranks);
  layout.expert_ffn = dims.expert_ffn;
  layout.shared_ffn = dims.shared_ffn;
  return layout;
}

ops::RouterDims router_dims(const MoeFfnDims& dims, int64_t num_routed) {
  return ops::RouterDims{num_routed, dims.num_experts, dims.top_k, dims.norm_topk_prob,
                         dims.balance_groups};
}

template <typename T>
void check_shared_weights(const MoeFfnWeights<T>& w, const MoeFfnDims& dims) {
  if (dims.shared_ffn == 0) return;
  MF_CHECK(w.shared_gate_proj && w.shared_up_proj && w.shared_down_proj,
           "moe_ffn: shared_ffn is {} but a shared expert projection weight is null",
           dims.shared_ffn);
}

template <typename T>
T sigmoid(double x) {
  return static_cast<T>(1.0 / (1.0 + std::exp(-x)));
}

// Router of num_routed tokens [num_routed, hidden]: saved.logits, probs, expert_idx and gates.
template <typename T>
void route(MoeFfnSaved<T>& saved, const T* tokens, const T* router, int64_t num_routed,
           const MoeFfnDims& dims) {
  saved.logits.resize(static_cast<size_t>(num_routed * dims.num_experts));
  ops::linear_forward<T>(saved.logits.data(), tokens, router, nullptr, num_routed, dims.hidden,
                         dims.num_experts);
  saved.probs.resize(saved.logits.size());
  saved.expert_idx.resize(static_cast<size_t>(num_routed * dims.top_k));
  saved.gates.resize(saved.expert_idx.size());
  ops::router_forward<T>(saved.probs.data(), saved.expert_idx.data(), saved.gates.data(),
                         saved.logits.data(), router_dims(dims, num_routed));
}

// The local experts on the expert-sorted saved.rows [num_rows, hidden] (offsets [num_local + 1]):
// saved.h_gate, h_up, h_act and y_rows, on layout.expert_ffn intermediate columns.
template <typename T>
void local_experts_forward(MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                           const int64_t* offsets, int64_t num_rows, const EpLayout& layout,
                           const MoeFfnDims& dims) {
  const int64_t hidden = dims.hidden;
  const int64_t ffn = layout.expert_ffn;
  const int64_t num_local_experts = layout.num_local_experts;
  saved.h_gate.resize(static_cast<size_t>(num_rows * ffn));
  saved.h_up.resize(saved.h_gate.size());
  saved.h_act.resize(saved.h_gate.size());
  ops::grouped_linear_forward<T>(saved.h_gate.data(), saved.rows.data(), weights.gate_proj, offsets,
                                 num_local_experts, hidden, ffn);
  ops::grouped_linear_forward<T>(saved.h_up.data(), saved.rows.data(), weights.up_proj, offsets,
                                 num_local_experts, hidden, ffn);
  ops::swiglu_forward<T>(saved.h_act.data(), saved.h_gate.data(), saved.h_up.data(),
                         num_rows * ffn);
  saved.y_rows.resize(static_cast<size_t>(num_rows * hidden));
  ops::grouped_linear_forward<T>(saved.y_rows.data(), saved.h_act.data(), weights.down_proj,
                                 offsets, num_local_experts, ffn, hidden);
}

// drows [num_rows, hidden] (assign) and the expert weight gradients (+=) from dy_rows [num_rows,
// hidden], the gradient of saved.y_rows.
template <typename T>
void local_experts_backward(T* drows, MoeFfnGrads<T>& grads, const T* dy_rows,
                            const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                            const int64_t* offsets, int64_t num_rows, const EpLayout& layout,
                            const MoeFfnDims& dims) {
  const int64_t hidden = dims.hidden;
  const int64_t ffn = layout.expert_ffn;
  const int64_t num_local_experts = layout.num_local_experts;
  std::vector<T> dh_act(static_cast<size_t>(num_rows * ffn));  // [num_rows, ffn]
  ops::grouped_linear_backward<T>(dh_act.data(), grads.down_proj, dy_rows, saved.h_act.data(),
                                  weights.down_proj, offsets, num_local_experts, ffn, hidden);
  std::vector<T> dh_gate(dh_act.size());  // [num_rows, ffn]
  std::vector<T> dh_up(dh_act.size());    // [num_rows, ffn]
  ops::swiglu_backward<T>(dh_gate.data(), dh_up.data(), dh_act.data(), saved.h_gate.data(),
                          saved.h_up.data(), num_rows * ffn);
  std::vector<T> drows_up(static_cast<size_t>(num_rows * hidden));  // [num_rows, hidden]
  ops::grouped_linear_backward<T>(drows, grads.gate_proj, dh_gate.data(), saved.rows.data(),
                                  weights.gate_proj, offsets, num_local_experts, hidden, ffn);
  ops::grouped_linear_backward<T>(drows_up.data(), grads.up_proj, dh_up.data(), saved.rows.data(),
                                  weights.up_proj, offsets, num_local_experts, hidden, ffn);
  for (size_t i = 0; i < drows_up.size(); ++i) drows[i] += drows_up[i];
}

// dinp += dlogits @ router and grads.router += dlogits^T @ inp for this rank's tokens; dlogits
// [num_tokens, num_experts].
template <typename T>
void add_router_gradients(T* dinp, MoeFfnGrads<T>& grads, const T* dlogits, const T* inp,
                          const MoeFfnWeights<T>& weights, const MoeFfnDims& dims) {
  std::vector<T> dinp_part(static_cast<size_t>(dims.num_tokens * dims.hidden));
  ops::linear_backward<T>(dinp_part.data(), grads.router, nullptr, dlogits, inp, weights.router,
                          dims.num_tokens, dims.hidden, dims.num_experts);
  for (size_t i = 0; i < dinp_part.size(); ++i) dinp[i] += dinp_part[i];
}

// out [num_tokens, hidden] += score * shared expert(inp) for inp [num_tokens, hidden], score =
// sigmoid(inp . shared_expert_gate) (1 without the gate), on shared_ffn intermediate columns (a
// partial sum under tp, with the slices of the weights). shared_ffn 0: no shared expert.
template <typename T>
void shared_expert_forward(T* out, MoeFfnSaved<T>& saved, const T* inp, int64_t num_tokens,
                           int64_t shared_ffn, const MoeFfnWeights<T>& weights, int64_t hidden) {
  if (shared_ffn == 0) {
    saved.shared = {};
    saved.shared_out.clear();
    saved.shared_score.clear();
    return;
  }
  saved.shared_out.resize(static_cast<size_t>(num_tokens * hidden));
  dense_ffn_forward<T>(saved.shared_out.data(), saved.shared, inp, weights.shared_gate_proj,
                       weights.shared_up_proj, weights.shared_down_proj, num_tokens, hidden,
                       shared_ffn);

  if (weights.shared_expert_gate == nullptr) {
    saved.shared_score.clear();
    for (size_t i = 0; i < saved.shared_out.size(); ++i) out[i] += saved.shared_out[i];
    return;
  }
  saved.shared_score.resize(static_cast<size_t>(num_tokens));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* x = inp + t * hidden;
    double logit = 0.0;
    for (int64_t i = 0; i < hidden; ++i) {
      logit += static_cast<double>(x[i]) * static_cast<double>(weights.shared_expert_gate[i]);
    }
    const T score = sigmoid<T>(logit);
    saved.shared_score[t] = score;
    const T* shared = saved.shared_out.data() + t * hidden;
    for (int64_t i = 0; i < hidden; ++i) out[t * hidden + i] += score * shared[i];
  }
}

// From dout [num_tokens, hidden], the gradient of the shared expert's weighted output:
// dshared_out [num_tokens, hidden] (assign) = score * dout, and with the gate dscore [num_tokens]
// (assign) = dout . shared_out per token (a partial sum under tp, like shared_out).
template <typename T>
void shared_output_backward(std::vector<T>& dshared_out, std::vector<T>& dscore, const T* dout,
                            const MoeFfnSaved<T>& saved, int64_t num_tokens, int64_t hidden) {
  dshared_out.assign(dout, dout + num_tokens * hidden);
  dscore.clear();
  if (saved.shared_score.empty()) return;
  dscore.resize(static_cast<size_t>(num_tokens));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T score = saved.shared_score[t];
    const T* dy = dout + t * hidden;
    const T* shared = saved.shared_out.data() + t * hidden;
    T sum = T(0);
    for (int64_t i = 0; i < hidden; ++i) {
      sum += dy[i] * shared[i];
      dshared_out[t * hidden + i] = score * dy[i];
    }
    dscore[t] = sum;
  }
}

// The shared expert gate of num_tokens tokens inp [num_tokens, hidden] with scores score and
// gradients dscore [num_tokens]: dlogit = dscore * score * (1 - score); grads.shared_expert_gate
// += dlogit * inp and dinp [num_tokens, hidden] += dlogit * shared_expert_gate.
template <typename T>
void shared_gate_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dscore, const T* score,
                          const T* inp, const MoeFfnWeights<T>& weights, int64_t num_tokens,
                          int64_t hidden) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T dlogit = dscore[t] * score[t] * (T(1) - score[t]);
    const T* x = inp + t * hidden;
    for (int64_t i = 0; i < hidden; ++i) {
      grads.shared_expert_gate[i] += dlogit * x[i];
      dinp[t * hidden + i] += dlogit * weights.shared_expert_gate[i];
    }
  }
}

// The shared expert's projections backward: dinp [num_tokens, hidden] += their input gradient
// from dshared_out; their weight gradients accumulate.
template <typename T>
void shared_projections_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dshared_out, const T* inp,
                                 const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                                 int64_t num_tokens, int64_t shared_ffn, int64_t hidden) {
  std::vector<T> dinp_part(static_cast<size_t>(num_tokens * hidden));  // [num_tokens, hidden]
  dense_ffn_backward<T>(dinp_part.data(), grads.shared_gate_proj, grads.shared_up_proj,
                        grads.shared_down_proj, dshared_out, inp, saved.shared,
                        weights.shared_gate_proj, weights.shared_up_proj, weights.shared_down_proj,
                        num_tokens, hidden, shared_ffn);
  for (size_t i = 0; i < dinp_part.size(); ++i) dinp[i] += dinp_part[i];
}

template <typename T>
void all_gather_forward(T* out, MoeFfnSaved<T>& saved, MoeFfnStats& stats, const T* inp,
                        const MoeFfnWeights<T>& weights, const MoeFfnDims& dims,
                        const EpLayout& layout, Communicator& ep) {
  const int64_t hidden = dims.hidden;
  const int64_t group_tokens = layout.group_tokens;
  const ops::RouterDims rdims = router_dims(dims, group_tokens);

  // Routing over the whole group: identical on every rank.
  saved.tokens.resize(static_cast<size_t>(group_tokens * hidden));
  ep.all_gather(inp, saved.tokens.data(), static_cast<size_t>(dims.num_tokens * hidden));
  route(saved, saved.tokens.data(), weights.router, group_tokens, dims);
  stats.aux_loss = ops::router_aux_loss<T>(saved.probs.data(), saved.expert_idx.data(), rdims);
  stats.z_loss = ops::router_z_loss<T>(saved.logits.data(), rdims);
  stats.expert_load.assign(static_cast<size_t>(dims.num_experts), 0);
  for (const int32_t e : saved.expert_idx) ++stats.expert_load[static_cast<size_t>(e)];

  // Rows of the local experts.
  const int64_t capacity =
      ops::expert_capacity(dims.capacity_factor, group_tokens, dims.top_k, dims.num_experts);
  saved.row_map =
      ops::build_row_map(saved.expert_idx.data(), group_tokens, dims.top_k, layout.expert_begin,
                         layout.expert_begin + layout.num_local_experts, capacity);
  stats.num_dropped = saved.row_map.num_dropped;
  const int64_t num_rows = saved.row_map.num_rows();
  saved.rows.resize(static_cast<size_t>(num_rows * hidden));
  ops::scatter_rows_forward<T>(saved.rows.data(), saved.tokens.data(), saved.row_map, hidden);
  local_experts_forward(saved, weights, saved.row_map.expert_offsets.data(), num_rows, layout,
                        dims);

  std::vector<T> combined(static_cast<size_t>(group_tokens * hidden));  // [group_tokens, hidden]
  ops::gather_rows_forward<T>(combined.data(), saved.y_rows.data(), saved.gates.data(),
                              saved.row_map, hidden);
  if (layout.tensor_parallel) {
    // The shared expert's slice on the group's tokens joins the partial sums.
    shared_expert_forward(combined.data(), saved, saved.tokens.data(), group_tokens,
                          layout.shared_ffn, weights, hidden);
  }
  ep.reduce_scatter_sum(combined.data(), out, static_cast<size_t>(dims.num_tokens * hidden));
}

template <typename T>
void all_gather_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dout, const T* inp,
                         const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                         const MoeFfnDims& dims, const EpLayout& layout, double d_aux, double d_z,
                         Communicator& ep) {
  const int64_t hidden = dims.hidden;
  const int64_t group_tokens = layout.group_tokens;
  const ops::RowMap& map = saved.row_map;
  MF_CHECK(map.num_tokens == group_tokens && map.top_k == dims.top_k &&
               map.expert_begin == layout.expert_begin &&
               static_cast<int64_t>(saved.tokens.size()) == group_tokens * hidden,
           "moe_ffn_backward: saved state is from a forward with other dims (row map of {} tokens "
           "x top_k {}, expected {} x {})",
           map.num_tokens, map.top_k, group_tokens, dims.top_k);
  const int64_t num_rows = map.num_rows();
  const size_t local_size = static_cast<size_t>(dims.num_tokens * hidden);

  // Routed experts, mirroring the forward: all-gather dout, gather^T, experts^T, scatter^T,
  // reduce-scatter.
  std::vector<T> dcombined(static_cast<size_t>(group_tokens * hidden));  // [group_tokens, hidden]
  ep.all_gather(dout, dcombined.data(), local_size);
  std::vector<T> dy_rows(static_cast<size_t>(num_rows * hidden));  // [num_rows, hidden]
  std::vector<T> dgates(saved.gates.size());                       // [group_tokens, top_k]
  ops::gather_rows_backward<T>(dy_rows.data(), dgates.data(), dcombined.data(), saved.y_rows.data(),
                               saved.gates.data(), map, hidden);
  std::vector<T> drows(dy_rows.size());  // [num_rows, hidden]
  local_experts_backward(drows.data(), grads, dy_rows.data(), saved, weights,
                         map.expert_offsets.data(), num_rows, layout, dims);
  std::vector<T> dtokens(dcombined.size());  // [group_tokens, hidden]
  ops::scatter_rows_backward<T>(dtokens.data(), drows.data(), map, hidden);
  std::vector<T> dscore;  // tp with a shared expert gate: [group_tokens] partial sums
  if (layout.tensor_parallel && layout.shared_ffn > 0) {
    std::vector<T> dshared_out;  // [group_tokens, hidden]
    shared_output_backward(dshared_out, dscore, dcombined.data(), saved, group_tokens, hidden);
    shared_projections_backward(dtokens.data(), grads, dshared_out.data(), saved.tokens.data(),
                                saved, weights, group_tokens, layout.shared_ffn, hidden);
  }
  ep.reduce_scatter_sum(dtokens.data(), dinp, local_size);

  // Router (see the comment at the top of the file).
  ep.all_reduce_sum(dgates.data(), dgates.size());
  std::vector<T> dlogits(saved.logits.size());  // [group_tokens, num_experts]
  ops::router_backward<T>(dlogits.data(), dgates.data(), saved.logits.data(), saved.probs.data(),
                          saved.expert_idx.data(), d_aux, d_z, router_dims(dims, group_tokens));
  const int64_t first = layout.rank * dims.num_tokens;  // this rank's first group token
  add_router_gradients(dinp, grads, dlogits.data() + first * dims.num_experts, inp, weights, dims);
  if (!dscore.empty()) {
    // The gate scores, like the router, on the local tokens only, from the summed gradients.
    ep.all_reduce_sum(dscore.data(), dscore.size());
    shared_gate_backward(dinp, grads, dscore.data() + first, saved.shared_score.data() + first, inp,
                         weights, dims.num_tokens, hidden);
  }
}

template <typename T>
void all_to_all_forward(T* out, MoeFfnSaved<T>& saved, MoeFfnStats& stats, const T* inp,
                        const MoeFfnWeights<T>& weights, const MoeFfnDims& dims,
                        const EpLayout& layout, Communicator& ep) {
  const int64_t hidden = dims.hidden;
  saved.tokens.clear();
  route(saved, inp, weights.router, dims.num_tokens, dims);
  const int64_t capacity =
      ops::expert_capacity(dims.capacity_factor, layout.group_tokens, dims.top_k, dims.num_experts);
  saved.a2a = plan_a2a_dispatch(saved.expert_idx.data(), dims.num_tokens, dims.top_k,
                                dims.num_experts, capacity, ep);
  const A2aDispatchPlan& plan = saved.a2a;
  const GroupRouterLosses losses =
      a2a_group_router_losses<T>(saved.probs.data(), saved.logits.data(), plan, dims.num_experts,
                                 dims.top_k, dims.balance_groups, ep);
  stats.aux_loss = losses.aux_loss;
  stats.z_loss = losses.z_loss;
  stats.expert_load = plan.group_load;
  stats.num_dropped = plan.num_dropped;

  // To the owners, into expert order there: the all-gather path's rows.
  const int64_t num_send = plan.send_map.num_rows();
  const int64_t num_rows = plan.recv_map.num_rows();
  std::vector<T> send(static_cast<size_t>(num_send * hidden));  // [num_send, hidden]
  ops::scatter_rows_forward<T>(send.data(), inp, plan.send_map, hidden);
  std::vector<T> received(static_cast<size_t>(num_rows * hidden));  // [num_rows, hidden]
  a2a_exchange_to_owners(send.data(), received.data(), plan, hidden, ep);
  saved.rows.resize(received.size());
  ops::scatter_rows_forward<T>(saved.rows.data(), received.data(), plan.recv_map, hidden);
  local_experts_forward(saved, weights, plan.recv_map.expert_offsets.data(), num_rows, layout,
                        dims);

  // Back to receive order (a gather with unit gates is a permutation), to the senders, combined.
  const std::vector<T> unit_gates(static_cast<size_t>(num_rows), T(1));
  ops::gather_rows_forward<T>(received.data(), saved.y_rows.data(), unit_gates.data(),
                              plan.recv_map, hidden);
  saved.returned.resize(send.size());
  a2a_exchange_to_senders(received.data(), saved.returned.data(), plan, hidden, ep);
  ops::gather_rows_forward<T>(out, saved.returned.data(), saved.gates.data(), plan.send_map,
                              hidden);
}

template <typename T>
void all_to_all_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dout, const T* inp,
                         const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                         const MoeFfnDims& dims, const EpLayout& layout, double d_aux, double d_z,
                         Communicator& ep) {
  const int64_t hidden = dims.hidden;
  const A2aDispatchPlan& plan = saved.a2a;
  MF_CHECK(plan.num_tokens == dims.num_tokens && plan.group_tokens == layout.group_tokens &&
               plan.send_map.top_k == dims.top_k &&
               plan.recv_map.expert_begin == layout.expert_begin,
           "moe_ffn_backward: saved state is from a forward with other dims ({} tokens x top_k "
           "{}, expected {} x {})",
           plan.num_tokens, plan.send_map.top_k, dims.num_tokens, dims.top_k);
  const int64_t num_send = plan.send_map.num_rows();
  const int64_t num_rows = plan.recv_map.num_rows();

  // Gate gradients here; output gradients to the owners, input gradients back.
  std::vector<T> dsend(static_cast<size_t>(num_send * hidden));  // [num_send, hidden]
  std::vector<T> dgates(saved.gates.size());                     // [num_tokens, top_k]
  ops::gather_rows_backward<T>(dsend.data(), dgates.data(), dout, saved.returned.data(),
                               saved.gates.data(), plan.send_map, hidden);
  std::vector<T> dreceived(static_cast<size_t>(num_rows * hidden));  // [num_rows, hidden]
  a2a_exchange_to_owners(dsend.data(), dreceived.data(), plan, hidden, ep);
  std::vector<T> dy_rows(dreceived.size());  // [num_rows, hidden] expert order
  ops::scatter_rows_forward<T>(dy_rows.data(), dreceived.data(), plan.recv_map, hidden);
  std::vector<T> drows(dy_rows.size());  // [num_rows, hidden] expert order
  local_experts_backward(drows.data(), grads, dy_rows.data(), saved, weights,
                         plan.recv_map.expert_offsets.data(), num_rows, layout, dims);
  const std::vector<T> unit_gates(static_cast<size_t>(num_rows), T(1));
  ops::gather_rows_forward<T>(dreceived.data(), drows.data(), unit_gates.data(), plan.recv_map,
                              hidden);
  a2a_exchange_to_senders(dreceived.data(), dsend.data(), plan, hidden, ep);
  ops::scatter_rows_backward<T>(dinp, dsend.data(), plan.send_map, hidden);

  // Router over this rank's tokens (see the comment at the top of the file): router_backward
  // normalises the z term by its own token count, the group's z-loss by the group's, so it gets
  // d_z scaled by num_tokens / group_tokens; the aux term, whose assignment fractions are the
  // group's, is added from the plan.
  std::vector<T> dlogits(saved.logits.size());  // [num_tokens, num_experts]
  const double d_z_local = layout.group_tokens == 0 ? 0.0
                                                    : d_z * static_cast<double>(dims.num_tokens) /
                                                          static_cast<double>(layout.group_tokens);
  ops::router_backward<T>(dlogits.data(), dgates.data(), saved.logits.data(), saved.probs.data(),
                          saved.expert_idx.data(), 0.0, d_z_local,
                          router_dims(dims, dims.num_tokens));
  a2a_add_group_aux_gradient<T>(dlogits.data(), saved.probs.data(), plan, dims.num_experts,
                                dims.top_k, dims.balance_groups, d_aux);
  add_router_gradients(dinp, grads, dlogits.data(), inp, weights, dims);
}

}  // namespace

template <typename T>
void moe_ffn_forward(T* out, MoeFfnSaved<T>& saved, MoeFfnStats& stats, const T* inp,
                     const MoeFfnWeights<T>& weights, const MoeFfnDims& dims, Communicator& ep) {
  const EpLayout layout = make_layout(dims, ep);
  check_shared_weights(weights, dims);
  saved.dispatch = layout.dispatch;
  stats.dispatch = layout.dispatch;
  if (layout.dispatch == EpDispatch::kAllToAll) {
    all_to_all_forward(out, saved, stats, inp, weights, dims, layout, ep);
  } else {
    all_gather_forward(out, saved, stats, inp, weights, dims, layout, ep);
  }
  if (!layout.tensor_parallel) {
    shared_expert_forward(out, saved, inp, dims.num_tokens, dims.shared_ffn, weights, dims.hidden);
  }
}

template <typename T>
void moe_ffn_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dout, const T* inp,
                      const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                      const MoeFfnDims& dims, double d_aux, double d_z, Communicator& ep) {
  const EpLayout layout = make_layout(dims, ep);
  check_shared_weights(weights, dims);
  MF_CHECK(saved.dispatch == layout.dispatch,
           "moe_ffn_backward: the forward ran the {} dispatch, these dims choose {}",
           ep_dispatch_name(saved.dispatch), ep_dispatch_name(layout.dispatch));
  if (layout.dispatch == EpDispatch::kAllToAll) {
    all_to_all_backward(dinp, grads, dout, inp, saved, weights, dims, layout, d_aux, d_z, ep);
  } else {
    all_gather_backward(dinp, grads, dout, inp, saved, weights, dims, layout, d_aux, d_z, ep);
  }
  if (!layout.tensor_parallel && dims.shared_ffn > 0) {
    // On the local tokens: the gate first, then the projections.
    std::vector<T> dshared_out, dscore;  // [num_tokens, hidden], [num_tokens]
    shared_output_backward(dshared_out, dscore, dout, saved, dims.num_tokens, dims.hidden);
    if (!dscore.empty()) {
      shared_gate_backward(dinp, grads, dscore.data(), saved.shared_score.data(), inp, weights,
                           dims.num_tokens, dims.hidden);
    }
    shared_projections_backward(dinp, grads, dshared_out.data(), inp, saved, weights,
                                dims.num_tokens, dims.shared_ffn, dims.hidden);
  }
}

#define MOEFORGE_INSTANTIATE_MOE_FFN(T)                                                        \
  template void moe_ffn_forward<T>(T*, MoeFfnSaved<T>&, MoeFfnStats&, const T*,                \
                                   const MoeFfnWeights<T>&, const MoeFfnDims&, Communicator&); \
  template void moe_ffn_backward<T>(T*, MoeFfnGrads<T>&, const T*, const T*,                   \
                                    const MoeFfnSaved<T>&, const MoeFfnWeights<T>&,            \
                                    const MoeFfnDims&, double, double, Communicator&);
MOEFORGE_INSTANTIATE_MOE_FFN(float)
MOEFORGE_INSTANTIATE_MOE_FFN(double)
#undef MOEFORGE_INSTANTIATE_MOE_FFN

}  // namespace moeforge
