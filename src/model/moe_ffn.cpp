// MoE FFN layer forward and backward by hand, in the all-gather / scatter / grouped GEMM / gather /
// reduce-scatter layout of MegaScale-MoE, plus the optional sigmoid-gated shared expert.
//
// Router gradient under expert parallelism. The router weight is replicated over the ep group and
// every rank routes all the group's tokens identically. The gate gradients of a token are split
// over the ranks that own its experts (each entry is non-zero on at most one rank), so they are
// summed by an all-reduce, which is exact; every rank then runs router_backward over the whole
// group (the aux and z terms are defined over the group) and gets identical logit gradients. Each
// rank keeps only the rows of its own local tokens: it adds dlogits[local]^T @ inp to grads.router
// and dlogits[local] @ router to dinp. grads.router on one rank is therefore the partial gradient
// of its token shard, like any replicated weight under sequence parallelism: the caller must sum
// grads.router over the ep group (with the other replicated weights). With one rank it is the full
// gradient and nothing needs summing.
#include "model/moe_ffn.h"

#include <cmath>

#include "core/error.h"
#include "model/dense_ffn.h"
#include "ops/grouped_linear.h"
#include "ops/linear.h"
#include "ops/permute.h"
#include "ops/router.h"
#include "ops/swiglu.h"

namespace moeforge {

namespace {

// Sizes that follow from the dims and the ep group.
struct EpLayout {
  int64_t rank;
  int64_t num_ranks;
  int64_t group_tokens;  // num_tokens * num_ranks
  int64_t num_local_experts;
  int64_t expert_begin;
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
  MF_CHECK(dims.num_experts % layout.num_ranks == 0,
           "moe_ffn: num_experts ({}) must be divisible by the expert-parallel size ({})",
           dims.num_experts, layout.num_ranks);
  layout.group_tokens = dims.num_tokens * layout.num_ranks;
  layout.num_local_experts = dims.num_experts / layout.num_ranks;
  layout.expert_begin = layout.rank * layout.num_local_experts;
  return layout;
}

ops::RouterDims router_dims(const MoeFfnDims& dims, const EpLayout& layout) {
  return ops::RouterDims{layout.group_tokens, dims.num_experts, dims.top_k, dims.norm_topk_prob};
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

}  // namespace

template <typename T>
void moe_ffn_forward(T* out, MoeFfnSaved<T>& saved, MoeFfnStats& stats, const T* inp,
                     const MoeFfnWeights<T>& weights, const MoeFfnDims& dims, Communicator& ep) {
  const EpLayout layout = make_layout(dims, ep);
  check_shared_weights(weights, dims);
  const int64_t hidden = dims.hidden;
  const int64_t ffn = dims.expert_ffn;
  const int64_t num_experts = dims.num_experts;
  const int64_t group_tokens = layout.group_tokens;
  const ops::RouterDims rdims = router_dims(dims, layout);

  // Routing over the whole group: identical on every rank.
  saved.tokens.resize(static_cast<size_t>(group_tokens * hidden));
  ep.all_gather(inp, saved.tokens.data(), static_cast<size_t>(dims.num_tokens * hidden));
  saved.logits.resize(static_cast<size_t>(group_tokens * num_experts));
  ops::linear_forward<T>(saved.logits.data(), saved.tokens.data(), weights.router, nullptr,
                         group_tokens, hidden, num_experts);
  saved.probs.resize(saved.logits.size());
  saved.expert_idx.resize(static_cast<size_t>(group_tokens * dims.top_k));
  saved.gates.resize(saved.expert_idx.size());
  ops::router_forward<T>(saved.probs.data(), saved.expert_idx.data(), saved.gates.data(),
                         saved.logits.data(), rdims);

  stats.aux_loss = ops::router_aux_loss<T>(saved.probs.data(), saved.expert_idx.data(), rdims);
  stats.z_loss = ops::router_z_loss<T>(saved.logits.data(), rdims);
  stats.expert_load.assign(static_cast<size_t>(num_experts), 0);
  for (const int32_t e : saved.expert_idx) ++stats.expert_load[static_cast<size_t>(e)];

  // Rows of the local experts.
  const int64_t capacity =
      ops::expert_capacity(dims.capacity_factor, group_tokens, dims.top_k, num_experts);
  saved.row_map =
      ops::build_row_map(saved.expert_idx.data(), group_tokens, dims.top_k, layout.expert_begin,
                         layout.expert_begin + layout.num_local_experts, capacity);
  stats.num_dropped = saved.row_map.num_dropped;
  const int64_t num_rows = saved.row_map.num_rows();
  const int64_t* offsets = saved.row_map.expert_offsets.data();

  saved.rows.resize(static_cast<size_t>(num_rows * hidden));
  ops::scatter_rows_forward<T>(saved.rows.data(), saved.tokens.data(), saved.row_map, hidden);
  saved.h_gate.resize(static_cast<size_t>(num_rows * ffn));
  saved.h_up.resize(saved.h_gate.size());
  saved.h_act.resize(saved.h_gate.size());
  ops::grouped_linear_forward<T>(saved.h_gate.data(), saved.rows.data(), weights.gate_proj, offsets,
                                 layout.num_local_experts, hidden, ffn);
  ops::grouped_linear_forward<T>(saved.h_up.data(), saved.rows.data(), weights.up_proj, offsets,
                                 layout.num_local_experts, hidden, ffn);
  ops::swiglu_forward<T>(saved.h_act.data(), saved.h_gate.data(), saved.h_up.data(),
                         num_rows * ffn);
  saved.y_rows.resize(static_cast<size_t>(num_rows * hidden));
  ops::grouped_linear_forward<T>(saved.y_rows.data(), saved.h_act.data(), weights.down_proj,
                                 offsets, layout.num_local_experts, ffn, hidden);

  std::vector<T> combined(static_cast<size_t>(group_tokens * hidden));  // [group_tokens, hidden]
  ops::gather_rows_forward<T>(combined.data(), saved.y_rows.data(), saved.gates.data(),
                              saved.row_map, hidden);
  ep.reduce_scatter_sum(combined.data(), out, static_cast<size_t>(dims.num_tokens * hidden));

  if (dims.shared_ffn == 0) {
    saved.shared = {};
    saved.shared_out.clear();
    saved.shared_score.clear();
    return;
  }
  saved.shared_out.resize(static_cast<size_t>(dims.num_tokens * hidden));
  dense_ffn_forward<T>(saved.shared_out.data(), saved.shared, inp, weights.shared_gate_proj,
                       weights.shared_up_proj, weights.shared_down_proj, dims.num_tokens, hidden,
                       dims.shared_ffn);

  if (weights.shared_expert_gate == nullptr) {
    saved.shared_score.clear();
    for (size_t i = 0; i < saved.shared_out.size(); ++i) out[i] += saved.shared_out[i];
    return;
  }
  saved.shared_score.resize(static_cast<size_t>(dims.num_tokens));
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
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

template <typename T>
void moe_ffn_backward(T* dinp, MoeFfnGrads<T>& grads, const T* dout, const T* inp,
                      const MoeFfnSaved<T>& saved, const MoeFfnWeights<T>& weights,
                      const MoeFfnDims& dims, double d_aux, double d_z, Communicator& ep) {
  const EpLayout layout = make_layout(dims, ep);
  check_shared_weights(weights, dims);
  const int64_t hidden = dims.hidden;
  const int64_t ffn = dims.expert_ffn;
  const int64_t num_experts = dims.num_experts;
  const int64_t group_tokens = layout.group_tokens;
  const ops::RowMap& map = saved.row_map;
  MF_CHECK(map.num_tokens == group_tokens && map.top_k == dims.top_k &&
               map.expert_begin == layout.expert_begin &&
               static_cast<int64_t>(saved.tokens.size()) == group_tokens * hidden,
           "moe_ffn_backward: saved state is from a forward with other dims (row map of {} tokens "
           "x top_k {}, expected {} x {})",
           map.num_tokens, map.top_k, group_tokens, dims.top_k);
  const int64_t num_rows = map.num_rows();
  const int64_t* offsets = map.expert_offsets.data();
  const size_t local_size = static_cast<size_t>(dims.num_tokens * hidden);

  // Routed experts, mirroring the forward: all-gather dout, gather^T, down^T, SwiGLU^T,
  // gate/up^T, scatter^T, reduce-scatter.
  std::vector<T> dcombined(static_cast<size_t>(group_tokens * hidden));  // [group_tokens, hidden]
  ep.all_gather(dout, dcombined.data(), local_size);
  std::vector<T> dy_rows(static_cast<size_t>(num_rows * hidden));  // [num_rows, hidden]
  std::vector<T> dgates(saved.gates.size());                       // [group_tokens, top_k]
  ops::gather_rows_backward<T>(dy_rows.data(), dgates.data(), dcombined.data(), saved.y_rows.data(),
                               saved.gates.data(), map, hidden);
  std::vector<T> dh_act(static_cast<size_t>(num_rows * ffn));  // [num_rows, ffn]
  ops::grouped_linear_backward<T>(dh_act.data(), grads.down_proj, dy_rows.data(),
                                  saved.h_act.data(), weights.down_proj, offsets,
                                  layout.num_local_experts, ffn, hidden);
  std::vector<T> dh_gate(dh_act.size());  // [num_rows, ffn]
  std::vector<T> dh_up(dh_act.size());    // [num_rows, ffn]
  ops::swiglu_backward<T>(dh_gate.data(), dh_up.data(), dh_act.data(), saved.h_gate.data(),
                          saved.h_up.data(), num_rows * ffn);
  std::vector<T> drows(static_cast<size_t>(num_rows * hidden));  // [num_rows, hidden]
  std::vector<T> drows_up(drows.size());                         // [num_rows, hidden]
  ops::grouped_linear_backward<T>(drows.data(), grads.gate_proj, dh_gate.data(), saved.rows.data(),
                                  weights.gate_proj, offsets, layout.num_local_experts, hidden,
                                  ffn);
  ops::grouped_linear_backward<T>(drows_up.data(), grads.up_proj, dh_up.data(), saved.rows.data(),
                                  weights.up_proj, offsets, layout.num_local_experts, hidden, ffn);
  for (size_t i = 0; i < drows.size(); ++i) drows[i] += drows_up[i];
  std::vector<T> dtokens(dcombined.size());  // [group_tokens, hidden]
  ops::scatter_rows_backward<T>(dtokens.data(), drows.data(), map, hidden);
  ep.reduce_scatter_sum(dtokens.data(), dinp, local_size);

  // Router (see the comment at the top of the file).
  ep.all_reduce_sum(dgates.data(), dgates.size());
  std::vector<T> dlogits(saved.logits.size());  // [group_tokens, num_experts]
  ops::router_backward<T>(dlogits.data(), dgates.data(), saved.logits.data(), saved.probs.data(),
                          saved.expert_idx.data(), d_aux, d_z, router_dims(dims, layout));
  std::vector<T> dinp_part(local_size);  // [num_tokens, hidden]
  ops::linear_backward<T>(dinp_part.data(), grads.router, nullptr,
                          dlogits.data() + layout.rank * dims.num_tokens * num_experts, inp,
                          weights.router, dims.num_tokens, hidden, num_experts);
  for (size_t i = 0; i < local_size; ++i) dinp[i] += dinp_part[i];

  if (dims.shared_ffn == 0) return;
  // out += score * shared_out, score = sigmoid(x . shared_expert_gate) (or 1 without the gate).
  std::vector<T> dshared_out(dout, dout + local_size);  // [num_tokens, hidden]
  if (weights.shared_expert_gate != nullptr) {
    for (int64_t t = 0; t < dims.num_tokens; ++t) {
      const T score = saved.shared_score[t];
      const T* dy = dout + t * hidden;
      const T* shared = saved.shared_out.data() + t * hidden;
      T dscore = T(0);
      for (int64_t i = 0; i < hidden; ++i) {
        dscore += dy[i] * shared[i];
        dshared_out[t * hidden + i] = score * dy[i];
      }
      const T dlogit = dscore * score * (T(1) - score);
      const T* x = inp + t * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        grads.shared_expert_gate[i] += dlogit * x[i];
        dinp[t * hidden + i] += dlogit * weights.shared_expert_gate[i];
      }
    }
  }
  dense_ffn_backward<T>(dinp_part.data(), grads.shared_gate_proj, grads.shared_up_proj,
                        grads.shared_down_proj, dshared_out.data(), inp, saved.shared,
                        weights.shared_gate_proj, weights.shared_up_proj, weights.shared_down_proj,
                        dims.num_tokens, hidden, dims.shared_ffn);
  for (size_t i = 0; i < local_size; ++i) dinp[i] += dinp_part[i];
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
