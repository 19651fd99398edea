// One MoE layer's inputs and weights (all experts) for the layer tests, in double, with the weight
// views of one rank of an expert-parallel group (its slice of the experts).
#pragma once

#include <cstdint>
#include <vector>

#include "model/moe_ffn.h"
#include "testing/gradcheck.h"

namespace moeforge::testing {

struct MoeLayerCase {
  MoeFfnDims dims;
  bool shared_gate;  // the shared expert (if any) has its sigmoid gate
  std::vector<double> inp, router, gate_proj, up_proj, down_proj;
  std::vector<double> shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate;

  MoeLayerCase(const MoeFfnDims& d, bool with_shared_gate, uint64_t seed)
      : dims(d), shared_gate(with_shared_gate) {
    const int64_t h = d.hidden, f = d.expert_ffn, e = d.num_experts, s = d.shared_ffn;
    inp = random_vector(d.num_tokens * h, seed);
    router = random_vector(e * h, seed + 1);
    gate_proj = random_vector(e * f * h, seed + 2, 0.7);
    up_proj = random_vector(e * f * h, seed + 3, 0.7);
    down_proj = random_vector(e * h * f, seed + 4, 0.7);
    shared_gate_proj = random_vector(s * h, seed + 5, 0.7);
    shared_up_proj = random_vector(s * h, seed + 6, 0.7);
    shared_down_proj = random_vector(h * s, seed + 7, 0.7);
    shared_expert_gate = random_vector(h, seed + 8);
  }

  // Weights of rank `rank` of `num_ranks`.
  MoeFfnWeights<double> weights(int rank = 0, int num_ranks = 1) const {
    const int64_t expert_size = dims.expert_ffn * dims.hidden;
    const int64_t first = rank * dims.num_experts / num_ranks * expert_size;
    const bool shared = dims.shared_ffn > 0;
    return {router.data(),
            gate_proj.data() + first,
            up_proj.data() + first,
            down_proj.data() + first,
            shared ? shared_gate_proj.data() : nullptr,
            shared ? shared_up_proj.data() : nullptr,
            shared ? shared_down_proj.data() : nullptr,
            shared && shared_gate ? shared_expert_gate.data() : nullptr};
  }
};

}  // namespace moeforge::testing
