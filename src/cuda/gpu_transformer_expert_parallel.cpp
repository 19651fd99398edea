// GpuTransformer's sequence/expert-parallel layer parts (MegaScale-MoE section 1): the group
// setup, Ulysses attention's all-to-alls, and the all-gather dispatch of the MoE layers: the
// exchanges over the group's tokens in chunks (on the model's stream) around the experts of each
// chunk (gpu_transformer_moe.cpp, on expert_stream_). The all-to-all dispatch:
// gpu_transformer_a2a.cpp.
#include <numeric>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/gpu_transformer.h"
#include "cuda/gpu_transformer_buffers.h"
#include "cuda/reductions.h"
#include "cuda/ulysses_exchange.h"

namespace moeforge::cuda {

void GpuTransformer::exposed_exchange(const std::function<void()>& fn) {
  if (timer_.enabled()) {
    timer_.split("_wait", stream_, [&] {
      group()->all_reduce_sum(scratch_->wait_word.data(), 1, CommDType::kInt32);
    });
  }
  timer_.split("_exchange", stream_, fn);
}

void GpuTransformer::set_expert_parallel_group(Communicator& group,
                                               const ExpertExchange& exchange) {
  MF_CHECK(n_ == 0, "set_expert_parallel_group must come before the first forward");
  MF_CHECK(tp_ == nullptr,
           "a model is sequence/expert-parallel or tensor-parallel, not both "
           "(set_tensor_parallel_group came first)");
  MF_CHECK(!graphs_enabled_, "CUDA graphs run one GPU's step only (set_cuda_graphs)");
  const int64_t size = group.size();
  MF_CHECK(config_.num_heads % size == 0 && config_.num_kv_heads % size == 0,
           "sequence parallelism over {} GPUs needs the attention heads ({}) and KV heads ({}) "
           "divisible by {}",
           size, config_.num_heads, config_.num_kv_heads, size);
  MF_CHECK(!config_.is_moe() || config_.num_experts % size == 0,
           "expert parallelism over {} GPUs needs the experts ({}) divisible by {}", size,
           config_.num_experts, size);
  const ExpertShard& held = layout_.expert_shard();
  MF_CHECK(!config_.is_moe() || (held.rank == group.rank() && held.size == size),
           "rank {} of an expert-parallel group of {} must hold expert shard {} of {} (the "
           "constructor's), not {} of {}",
           group.rank(), size, group.rank(), size, held.rank, held.size);
  const int64_t overlap_chunks = exchange.overlap_chunks;
  MF_CHECK(overlap_chunks >= 1, "expert-parallel overlap chunks must be >= 1, got {}",
           overlap_chunks);
  const bool drops = config_.capacity_factor > 0.0;
  MF_CHECK(overlap_chunks <= 1 || !drops,
           "expert-parallel overlap in {} chunks needs capacity_factor 0: token dropping keeps "
           "each expert's earliest rows of the whole group (set the overlap chunks to 1)",
           overlap_chunks);
  const EpDispatchPlan& dispatch = exchange.dispatch;
  MF_CHECK(dispatch.size() == 1 || static_cast<int64_t>(dispatch.size()) == config_.num_layers,
           "an expert dispatch plan of {} entries for a model of {} decoder layers (one for every "
           "layer, or one per layer)",
           dispatch.size(), config_.num_layers);
  a2a_layers_.clear();
  if (size > 1 && config_.is_moe()) {
    a2a_layers_.assign(static_cast<size_t>(config_.num_layers), 0);
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      if (!config_.layer_is_moe(l) ||
          choose_ep_dispatch(dispatch.layer(l), config_.num_experts_per_tok, size) !=
              EpDispatch::kAllToAll) {
        continue;
      }
      // The chunks split each rank's tokens of an all-gather; the all-to-all sends the rows of
      // all of them at once.
      MF_CHECK(overlap_chunks == 1,
               "parallel.ep_overlap_chunks {} overlaps the all-gather dispatch's exchanges, but "
               "layer {} takes the all-to-all dispatch (set parallel.ep_overlap_chunks to 1, or "
               "parallel.ep_dispatch to \"allgather\")",
               overlap_chunks, l);
      a2a_layers_[static_cast<size_t>(l)] = 1;
    }
  }
  ep_ = size > 1 ? &group : nullptr;
  ep_exchange_ = exchange.dtype;
  ep_chunks_requested_ = overlap_chunks;
  if (ep_ != nullptr && expert_stream_ == nullptr) {
    // Blocking, like stream_: ordered with the legacy stream's synchronous copies.
    MF_CUDA_CHECK(cudaStreamCreate(&expert_stream_));
  }
  accumulated_ranges_.clear();
  find_accumulated_ranges();
}

int64_t GpuTransformer::overlap_chunks_for(int64_t n) const {
  if (ep_ == nullptr || !config_.is_moe()) return 1;
  return std::gcd(ep_chunks_requested_, n);
}

GpuTransformer::ExpertRows GpuTransformer::chunk_expert_rows(int64_t l, int64_t chunk) const {
  const Layer& a = layers_[static_cast<size_t>(l)];
  if (a2a_layer(l)) return {a.a2a_maps.expert_offsets, a.host_offsets.data()};
  const int64_t at = chunk * (num_local_experts() + 1);
  return {a.expert_offsets.data() + at, a.host_offsets.data() + at};
}

void GpuTransformer::ulysses_exchange(const std::vector<UlyssesTensor>& tensors, bool to_heads,
                                      int64_t batch, int64_t seq) {
  Scratch& s = *scratch_;
  const UlyssesShape shape{batch, seq, config_.head_dim, expert_parallel_size()};
  if (to_heads) {
    ulysses_pack_local(s.exchange_send.data(), tensors, shape, stream_);
  } else {
    ulysses_pack_heads(s.exchange_send.data(), tensors, shape, stream_);
  }
  exposed_exchange([&] {
    ep_->all_to_all(s.exchange_send.data(), s.exchange_recv.data(),
                    static_cast<size_t>(ulysses_chunk(tensors, shape)), CommDType::kBFloat16);
  });
  if (to_heads) {
    ulysses_unpack_heads(s.exchange_recv.data(), tensors, shape, stream_);
  } else {
    ulysses_unpack_local(s.exchange_recv.data(), tensors, shape, stream_);
  }
}

void GpuTransformer::ulysses_attention_forward(int64_t l, int64_t batch, int64_t seq) {
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t heads = config_.num_heads, kv_heads = config_.num_kv_heads;
  const int64_t ranks = expert_parallel_size();
  ulysses_exchange({{a.q.data(), a.q_heads.data(), heads},
                    {a.k.data(), a.k_heads.data(), kv_heads},
                    {a.v.data(), a.v_heads.data(), kv_heads}},
                   true, batch, seq);
  attention_.forward(
      a.att_heads.data(), a.lse.data(), a.q_heads.data(), a.k_heads.data(), a.v_heads.data(),
      AttentionShape{batch, seq * ranks, heads / ranks, kv_heads / ranks, config_.head_dim},
      stream_);
  ulysses_exchange({{a.att.data(), a.att_heads.data(), heads}}, false, batch, seq);
}

void GpuTransformer::ulysses_attention_backward(int64_t l, int64_t batch, int64_t seq) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t heads = config_.num_heads, kv_heads = config_.num_kv_heads;
  const int64_t ranks = expert_parallel_size();
  ulysses_exchange({{s.datt.data(), s.datt_heads.data(), heads}}, true, batch, seq);
  attention_.backward(
      s.dq_heads.data(), s.dk_heads.data(), s.dv_heads.data(), s.datt_heads.data(),
      a.q_heads.data(), a.k_heads.data(), a.v_heads.data(), a.att_heads.data(), a.lse.data(),
      AttentionShape{batch, seq * ranks, heads / ranks, kv_heads / ranks, config_.head_dim},
      stream_);
  ulysses_exchange({{s.dq.data(), s.dq_heads.data(), heads},
                    {s.dk.data(), s.dk_heads.data(), kv_heads},
                    {s.dv.data(), s.dv_heads.data(), kv_heads}},
                   false, batch, seq);
}

void GpuTransformer::reduce_scatter_group(const float* group, float* out, int64_t count) {
  if (ep_exchange_ == GradReduceDtype::kBfloat16) {
    ep_reducer_.reduce_scatter(group, static_cast<size_t>(count), out, *ep_,
                               GradReduceDtype::kBfloat16, stream_);
  } else {
    ep_->reduce_scatter_sum(group, out, static_cast<size_t>(count), CommDType::kFloat32);
  }
}

void GpuTransformer::moe_group_forward(int64_t l, float* x_out) {
  Layer& a = layers_[static_cast<size_t>(l)];
  const int64_t h = config_.hidden_size, chunks = ep_chunks_, m = n_ / chunks;
  const int64_t ranks = expert_parallel_size();
  events_.rewind();
  // The experts' stream starts after what stream_ has enqueued (ln2, the optimizer's waits).
  events_.order(stream_, expert_stream_);
  // Every chunk's all-gather first (they need only ln2): chunk c's experts wait for the c-th. The
  // first is exposed (charged to moe_exchange), the others overlap the experts.
  std::vector<cudaEvent_t> gathered(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    const auto gather = [&] {
      ep_->all_gather(a.ln2_ptr + c * m * h, a.ln2_group.data() + c * ranks * m * h,
                      static_cast<size_t>(m * h), CommDType::kBFloat16);
    };
    if (c == 0) {
      exposed_exchange(gather);
    } else {
      gather();
    }
    gathered[static_cast<size_t>(c)] = events_.record(stream_);
  }
  // Chunk c's reduce-scatter waits for its experts and overlaps chunk c + 1's; the last is
  // exposed.
  for (int64_t c = 0; c < chunks; ++c) {
    EventPool::wait(expert_stream_, gathered[static_cast<size_t>(c)]);
    moe_chunk_forward(l, c, a.ln2_group.data(), scratch_->group_f32.data(), nullptr,
                      expert_stream_);
    events_.order(expert_stream_, stream_);
    const auto scatter = [&] {
      reduce_scatter_group(scratch_->group_f32.data() + c * ranks * m * h, x_out + c * m * h,
                           m * h);
    };
    if (c + 1 == chunks) {
      exposed_exchange(scatter);
    } else {
      scatter();
    }
  }
  // The per-expert GEMMs copied each chunk's offsets already.
  if (grouped_experts_) {
    MF_CUDA_CHECK(
        cudaMemcpyAsync(a.host_offsets.data(), a.expert_offsets.data(),
                        static_cast<size_t>(chunks * (num_local_experts() + 1)) * sizeof(int32_t),
                        cudaMemcpyDeviceToHost, stream_));
  }
}

void GpuTransformer::moe_group_backward(int64_t l) {
  Scratch& s = *scratch_;
  const int64_t h = config_.hidden_size, k = config_.num_experts_per_tok;
  const int64_t chunks = ep_chunks_, m = n_ / chunks, ranks = expert_parallel_size();
  const bool bf16_exchange = ep_exchange_ == GradReduceDtype::kBfloat16;
  // bf16: the output gradient is gathered in bf16 (group_bf16 [ranks * n | n, h]) and widened.
  bf16* gathered_bf16 = bf16_exchange ? s.group_bf16.data() : nullptr;
  bf16* mine_bf16 = bf16_exchange ? gathered_bf16 + ranks * n_ * h : nullptr;
  if (bf16_exchange) cast_to_bf16(mine_bf16, s.dres.data(), n_ * h, stream_);
  events_.rewind();
  events_.order(stream_, expert_stream_);
  // Every chunk's all-gather of the output gradient first; the first is exposed.
  std::vector<cudaEvent_t> gathered(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    float* group = s.group_f32.data() + c * ranks * m * h;
    const auto gather = [&] {
      if (bf16_exchange) {
        ep_->all_gather(mine_bf16 + c * m * h, gathered_bf16 + c * ranks * m * h,
                        static_cast<size_t>(m * h), CommDType::kBFloat16);
      } else {
        ep_->all_gather(s.dres.data() + c * m * h, group, static_cast<size_t>(m * h),
                        CommDType::kFloat32);
      }
    };
    if (c == 0) {
      exposed_exchange(gather);
    } else {
      gather();
    }
    if (bf16_exchange)
      cast_to_float(group, gathered_bf16 + c * ranks * m * h, ranks * m * h, stream_);
    gathered[static_cast<size_t>(c)] = events_.record(stream_);
  }
  // Each chunk's input gradient, then its reduce-scatter (and the gate gradients' sum: each rank
  // has those of its experts' rows) beside the next chunk's; the experts' weight gradients last,
  // beside the last chunk's exchanges.
  for (int64_t c = 0; c < chunks; ++c) {
    EventPool::wait(expert_stream_, gathered[static_cast<size_t>(c)]);
    moe_chunk_backward_input(l, c, s.group_f32.data(), s.group_f32.data(), expert_stream_);
    events_.order(expert_stream_, stream_);
    reduce_scatter_group(s.group_f32.data() + c * ranks * m * h, s.dln.data() + c * m * h, m * h);
    ep_->all_reduce_sum(s.dgates.data() + c * ranks * m * k, static_cast<size_t>(ranks * m * k),
                        CommDType::kFloat32);
  }
  const bf16* x_group = layers_[static_cast<size_t>(l)].ln2_group.data();
  for (int64_t c = 0; c < chunks; ++c) moe_chunk_backward_weight(l, c, x_group, expert_stream_);
  events_.order(expert_stream_, stream_);
}

}  // namespace moeforge::cuda
