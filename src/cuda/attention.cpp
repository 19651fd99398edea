// cuda::Attention (see attention.h): cuDNN fused attention (frontend graph API; one forward graph
// with the softmax statistics as an output and one backward graph per shape, built on first use and
// cached, or cached as absent where building fails) and the dispatch to our kernels where cuDNN
// does not run the shape or AttentionBackend::ours asks for them.
#include "cuda/attention.h"

#include <fmt/format.h>

#include <cudnn.h>
#include <cudnn_frontend.h>

#include <cmath>

#include "core/error.h"
#include "cuda/attention_fallback.h"
#include "cuda/attention_single_key.h"
#include "cuda/cuda_check.h"

namespace moeforge::cuda {

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;

ShapeKey key_of(const AttentionShape& s) {
  return {s.batch, s.seq, s.num_q_heads, s.num_kv_heads, s.head_dim};
}

void check_fe(fe::error_t status, const char* what, const AttentionShape& s) {
  if (status.is_good()) return;
  MF_FAIL(
      "cuDNN attention ({}) failed for batch {}, seq {}, {} query heads, {} KV heads, head dim "
      "{}: {}",
      what, s.batch, s.seq, s.num_q_heads, s.num_kv_heads, s.head_dim, status.get_message());
}

// [batch, heads, seq, dim] view of the token-major [batch, seq, heads, dim] tensor.
std::shared_ptr<fe::graph::Tensor_attributes> token_major(fe::graph::Graph& g, const char* name,
                                                          int64_t uid, int64_t batch, int64_t heads,
                                                          int64_t seq, int64_t dim) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({batch, heads, seq, dim})
                      .set_stride({seq * heads * dim, dim, heads * dim, 1}));
}

// Whether cuDNN runs the graph: every step of building it succeeds (the frontend's validation,
// heuristics, support check and plan building). If not, says once on stderr which step refused
// the shape and why, since the fallback kernels are much slower.
bool build(fe::graph::Graph& g, cudnnHandle_t handle, const AttentionShape& s, const char* what) {
  fe::error_t status = g.validate();
  if (status.is_good()) status = g.build_operation_graph(handle);
  if (status.is_good()) status = g.create_execution_plans({fe::HeurMode_t::A});
  if (status.is_good()) status = g.check_support(handle);
  if (status.is_good()) status = g.build_plans(handle);
  if (status.is_good()) return true;
  fmt::print(stderr,
             "moeforge: cuDNN attention {} does not run batch {}, seq {}, {} query heads, {} KV "
             "heads, head dim {} ({}); using moeforge's own attention kernels instead (slower)\n",
             what, s.batch, s.seq, s.num_q_heads, s.num_kv_heads, s.head_dim, status.get_message());
  return false;
}

void check_heads(const AttentionShape& s) {
  MF_CHECK(s.num_kv_heads > 0 && s.num_q_heads % s.num_kv_heads == 0,
           "attention: {} query heads are not a multiple of {} KV heads", s.num_q_heads,
           s.num_kv_heads);
}

}  // namespace

struct Attention::Graphs {
  cudnnHandle_t handle = nullptr;
  // Null where cuDNN does not run the shape.
  std::map<ShapeKey, std::unique_ptr<fe::graph::Graph>> forward, backward;
  DeviceBuffer<uint8_t> workspace;

  // The built graph of this direction and shape, or null where cuDNN does not run it.
  fe::graph::Graph* get(bool is_forward, const AttentionShape& s) {
    auto& cache = is_forward ? forward : backward;
    auto it = cache.find(key_of(s));
    if (it != cache.end()) return it->second.get();
    auto g = std::make_unique<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const int64_t b = s.batch, hq = s.num_q_heads, hk = s.num_kv_heads, n = s.seq, d = s.head_dim;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    auto q = token_major(*g, "q", kQ, b, hq, n, d);
    auto k = token_major(*g, "k", kK, b, hk, n, d);
    auto v = token_major(*g, "v", kV, b, hk, n, d);
    if (is_forward) {
      auto attrs = fe::graph::SDPA_attributes()
                       .set_name("sdpa")
                       .set_generate_stats(true)
                       .set_causal_mask(true)
                       .set_attn_scale(scale);
      auto [o, stats] = g->sdpa(q, k, v, attrs);
      o->set_output(true).set_uid(kO).set_dim({b, hq, n, d}).set_stride({n * hq * d, d, hq * d, 1});
      stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT);
    } else {
      auto o = token_major(*g, "o", kO, b, hq, n, d);
      auto dout = token_major(*g, "dO", kDO, b, hq, n, d);
      auto stats = g->tensor(fe::graph::Tensor_attributes()
                                 .set_name("stats")
                                 .set_uid(kStats)
                                 .set_dim({b, hq, n, 1})
                                 .set_stride({hq * n, n, 1, 1})
                                 .set_data_type(fe::DataType_t::FLOAT));
      auto attrs = fe::graph::SDPA_backward_attributes()
                       .set_name("sdpa_backward")
                       .set_causal_mask(true)
                       .set_attn_scale(scale);
      auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, attrs);
      dq->set_output(true)
          .set_uid(kDQ)
          .set_dim({b, hq, n, d})
          .set_stride({n * hq * d, d, hq * d, 1});
      dk->set_output(true)
          .set_uid(kDK)
          .set_dim({b, hk, n, d})
          .set_stride({n * hk * d, d, hk * d, 1});
      dv->set_output(true)
          .set_uid(kDV)
          .set_dim({b, hk, n, d})
          .set_stride({n * hk * d, d, hk * d, 1});
    }
    if (!build(*g, handle, s, is_forward ? "forward" : "backward")) {
      return cache.emplace(key_of(s), nullptr).first->second.get();
    }
    int64_t workspace_bytes = 0;
    check_fe(g->get_workspace_size(workspace_bytes), "workspace", s);
    if (static_cast<size_t>(workspace_bytes) > workspace.size()) {
      workspace.resize(static_cast<size_t>(workspace_bytes));
    }
    return cache.emplace(key_of(s), std::move(g)).first->second.get();
  }

  void run(fe::graph::Graph& g, std::unordered_map<int64_t, void*>& pack, cudaStream_t stream,
           const AttentionShape& s, const char* what) {
    if (cudnnSetStream(handle, stream) != CUDNN_STATUS_SUCCESS) {
      MF_FAIL("cudnnSetStream failed");
    }
    check_fe(g.execute(handle, pack, workspace.data()), what, s);
  }
};

Attention::Attention(AttentionBackend backend)
    : backend_(backend),
      graphs_(std::make_unique<Graphs>()),
      fallback_(std::make_unique<AttentionFallback>()) {
  const cudnnStatus_t status = cudnnCreate(&graphs_->handle);
  MF_CHECK(status == CUDNN_STATUS_SUCCESS, "cudnnCreate failed: {}", cudnnGetErrorString(status));
}

Attention::~Attention() {
  graphs_->forward.clear();
  graphs_->backward.clear();
  if (graphs_->handle != nullptr) cudnnDestroy(graphs_->handle);
}

void Attention::forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                        const AttentionShape& shape, cudaStream_t stream) {
  check_heads(shape);
  if (shape.batch == 0 || shape.seq == 0) return;
  fe::graph::Graph* g =
      backend_ == AttentionBackend::automatic ? graphs_->get(true, shape) : nullptr;
  if (g == nullptr) {
    fallback_->forward(out, lse, q, k, v, shape, stream);
    return;
  }
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<bf16*>(q)},
                                          {kK, const_cast<bf16*>(k)},
                                          {kV, const_cast<bf16*>(v)},
                                          {kO, out},
                                          {kStats, lse}};
  graphs_->run(*g, pack, stream, shape, "forward");
}

void Attention::backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                         const bf16* k, const bf16* v, const bf16* out, const float* lse,
                         const AttentionShape& shape, cudaStream_t stream) {
  check_heads(shape);
  if (shape.batch == 0 || shape.seq == 0) return;
  const bool automatic = backend_ == AttentionBackend::automatic;
  if (automatic && shape.seq == 1) {  // cuDNN rejects s_q = s_kv = 1
    attention_backward_single_key(dq, dk, dv, dout, shape.batch, shape.num_q_heads,
                                  shape.num_kv_heads, shape.head_dim, stream);
    return;
  }
  fe::graph::Graph* g = automatic ? graphs_->get(false, shape) : nullptr;
  if (g == nullptr) {
    fallback_->backward(dq, dk, dv, dout, q, k, v, out, lse, shape, stream);
    return;
  }
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<bf16*>(q)},
                                          {kK, const_cast<bf16*>(k)},
                                          {kV, const_cast<bf16*>(v)},
                                          {kO, const_cast<bf16*>(out)},
                                          {kDO, const_cast<bf16*>(dout)},
                                          {kStats, const_cast<float*>(lse)},
                                          {kDQ, dq},
                                          {kDK, dk},
                                          {kDV, dv}};
  graphs_->run(*g, pack, stream, shape, "backward");
}

}  // namespace moeforge::cuda
