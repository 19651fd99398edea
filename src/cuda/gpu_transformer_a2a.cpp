// GpuTransformer's MoE layers under the all-to-all dispatch of expert parallelism
// (model/moe_dispatch_a2a.h is the spec, cuda/moe_dispatch_a2a.h its device part): each rank routes
// its own tokens, the host plans the exchanges from that routing and the group's per-expert
// counts, the kept (token, slot) rows travel in bf16 to their experts' ranks and back through the
// group's NCCL communicator, the experts run on the rows received in the all-gather dispatch's
// order, and each rank combines its own tokens' outputs. Everything runs on stream_, the experts'
// weight gradients on expert_stream_ beside the backward's last exchange.
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/gpu_transformer.h"
#include "cuda/gpu_transformer_buffers.h"
#include "cuda/moe_dispatch.h"
#include "cuda/moe_dispatch_a2a.h"
#include "cuda/router.h"
#include "ops/row_map.h"

namespace moeforge::cuda {

void GpuTransformer::moe_a2a_forward(int64_t l, float* x_out, float* losses) {
  const LayerOffsets& o = layout_.layer(l);
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t n = n_, h = config_.hidden_size;
  const int64_t num_experts = config_.num_experts, k = config_.num_experts_per_tok;
  const int64_t rank = expert_parallel_rank();
  // The router on this rank's tokens; the losses average over the group's.
  const RouterShape shape{
      n, num_experts, k, config_.norm_topk_prob, config_.router_balance_groups, moe_tokens()};
  blas_.linear_forward(a.router_logits.data(), OutType::kFloat, a.ln2_ptr, wb(o.router), nullptr, n,
                       h, num_experts, false, stream_);
  router_forward(a.probs.data(), a.expert_idx.data(), a.gates.data(), a.router_logits.data(), shape,
                 stream_);
  // This rank's router sums and counts (its row of the group's [ranks, E] counts), then the
  // group's: the counts all-gathered in place, the sums all-reduced.
  int32_t* loads = s.a2a_loads.data();
  router_loss_sums(s.a2a_sums.data(), loads + rank * num_experts, s.router_scratch.data(),
                   a.probs.data(), a.expert_idx.data(), a.router_logits.data(), shape, stream_);
  exposed_exchange([&] {
    ep_->all_gather(loads + rank * num_experts, loads, static_cast<size_t>(num_experts),
                    CommDType::kInt32);
    ep_->all_reduce_sum(s.a2a_sums.data(), static_cast<size_t>(num_experts + 1),
                        CommDType::kFloat32);
  });
  plan_a2a_layer(l);
  const A2aDispatchPlan& plan = a.a2a_plan;
  router_losses_from_sums(losses, s.a2a_sums.data(), a.a2a_maps.group_load, shape, stream_);

  // This rank's kept rows to their experts' ranks; the rows received, in expert order, are the
  // all-gather dispatch's rows of this rank's experts.
  a2a_send_order(s.a2a_send.data(), a.ln2_ptr, a.a2a_maps, plan, h, stream_);
  exposed_exchange([&] {
    a2a_exchange_to_owners(s.a2a_send.data(), a.a2a_received.data(), plan, h, CommDType::kBFloat16,
                           *ep_);
  });
  a2a_expert_order(s.rows.data(), a.a2a_received.data(), a.a2a_maps, plan, h, stream_);
  // The down projection writes the experts' outputs over their inputs in rows.
  experts_forward(l, s.rows.data(), s.rows.data(), 0, moe_tokens() * k, chunk_expert_rows(l, 0),
                  stream_);
  // The outputs back in receive order to the ranks that sent the rows, and the gate-weighted sum
  // of each token's returned rows onto the residual stream.
  a2a_receive_order(s.a2a_recv.data(), s.rows.data(), a.a2a_maps, plan, h, stream_);
  exposed_exchange([&] {
    a2a_exchange_to_senders(s.a2a_recv.data(), a.a2a_returned.data(), plan, h, CommDType::kBFloat16,
                            *ep_);
  });
  combine_rows(x_out, a.x_mid.data(), a.a2a_returned.data(), a.gates.data(),
               a.a2a_maps.send_assignment_row, n, k, h, stream_);
}

void GpuTransformer::plan_a2a_layer(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const int64_t n = n_, num_experts = config_.num_experts, k = config_.num_experts_per_tok;
  const int64_t ranks = expert_parallel_size();
  // The host waits for the routing and the group's counts: the one wait of the layer.
  int32_t* routing = s.a2a_routing.data();  // [n, k]
  int32_t* counts = routing + n * k;        // [ranks, E]
  MF_CUDA_CHECK(cudaMemcpyAsync(routing, a.expert_idx.data(),
                                static_cast<size_t>(n * k) * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream_));
  MF_CUDA_CHECK(cudaMemcpyAsync(counts, s.a2a_loads.data(),
                                static_cast<size_t>(ranks * num_experts) * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream_));
  MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  const std::vector<int64_t> loads(counts, counts + ranks * num_experts);
  // The capacity of the group's tokens, as the all-gather dispatch's (one chunk).
  const int64_t capacity =
      ops::expert_capacity(config_.capacity_factor, moe_tokens(), k, num_experts);
  a.a2a_plan = plan_a2a_dispatch_from_loads(routing, n, k, num_experts, capacity, loads.data(),
                                            expert_parallel_rank(), ranks);
  const A2aDispatchPlan& plan = a.a2a_plan;
  a.a2a_maps = upload_a2a_maps(a.a2a_maps_buffer.data(), s.a2a_staging.data(),
                               static_cast<int64_t>(s.a2a_staging.size()), plan, stream_);
  // The statistics' host copies (forward_backward reads them after the step) and the local
  // experts' row ranges that the per-expert GEMMs read.
  for (int64_t e = 0; e < num_experts; ++e) {
    a.host_counts.data()[e] = static_cast<int32_t>(plan.group_load[static_cast<size_t>(e)]);
  }
  for (int64_t e = 0; e <= num_local_experts(); ++e) {
    a.host_offsets.data()[e] =
        static_cast<int32_t>(plan.recv_map.expert_offsets[static_cast<size_t>(e)]);
  }
}

void GpuTransformer::moe_a2a_backward(int64_t l) {
  Layer& a = layers_[static_cast<size_t>(l)];
  Scratch& s = *scratch_;
  const A2aDispatchPlan& plan = a.a2a_plan;
  const A2aDeviceMaps& maps = a.a2a_maps;
  const int64_t n = n_, h = config_.hidden_size, k = config_.num_experts_per_tok;
  const int64_t max_rows = moe_tokens() * k;
  const ExpertRows ranges = chunk_expert_rows(l, 0);
  // The gate gradients of this rank's tokens, and the gradients of the returned rows (send order)
  // to the experts, in expert order there (drows: kept for the down projection's weight gradient).
  combine_rows_backward(s.a2a_send.data(), s.dgates.data(), s.dres.data(), a.a2a_returned.data(),
                        a.gates.data(), maps.send_assignment_row, n, k, h, stream_);
  exposed_exchange([&] {
    a2a_exchange_to_owners(s.a2a_send.data(), s.a2a_recv.data(), plan, h, CommDType::kBFloat16,
                           *ep_);
  });
  a2a_expert_order(s.drows.data(), s.a2a_recv.data(), maps, plan, h, stream_);
  // The experts' input gradient (into rows), back in receive order to the senders.
  experts_backward_input(l, s.rows.data(), s.drows.data(), 0, max_rows, ranges, stream_);
  a2a_receive_order(s.a2a_recv.data(), s.rows.data(), maps, plan, h, stream_);
  // The experts' weight gradients on expert_stream_, from their inputs rebuilt in expert order
  // from the received rows (rows is free again), beside the exchange back.
  events_.rewind();
  events_.order(stream_, expert_stream_);
  a2a_expert_order(s.rows.data(), a.a2a_received.data(), maps, plan, h, expert_stream_);
  experts_backward_weight(l, s.drows.data(), s.rows.data(), 0, !accumulate_grads_, ranges,
                          expert_stream_);
  exposed_exchange([&] {
    a2a_exchange_to_senders(s.a2a_recv.data(), s.a2a_send.data(), plan, h, CommDType::kBFloat16,
                            *ep_);
  });
  // dln (assigned) = the sum of each token's slots' input gradients.
  scatter_rows_backward(s.dln.data(), s.a2a_send.data(), maps.send_assignment_row, n, k, h,
                        stream_);
  // The shared expert's backward reuses dh_gate and dh_up, which the weight gradients read.
  events_.order(expert_stream_, stream_);
}

}  // namespace moeforge::cuda
