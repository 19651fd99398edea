// The kernel lab of the experts' GEMMs (`moeforge bench gemm`): one MoE projection over a random
// routing, run by every candidate this build has (per-expert cuBLASLt calls, each compiled
// configuration of CUTLASS's grouped GEMM, cuBLAS's grouped batched GEMM), against one dense
// cuBLASLt GEMM of the same FLOPs, for the forward, input-gradient and weight-gradient products
// (the last assigned and accumulated).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>

namespace moeforge::cuda {

struct GemmLabOptions {
  int64_t tokens = 16384;
  int64_t hidden = 2048;      // in
  int64_t expert_ffn = 2048;  // out
  int64_t num_experts = 16;
  int64_t top_k = 2;
  int64_t repeats = 20;
  uint64_t seed = 7;
};

// {"rows", ..., "forward": {candidate: {"ms", "tflops", "over_dense"}}, "backward_input": ...,
// "backward_weight": ..., "backward_weight_accumulate": ...}; candidates that cannot run here are
// absent. The CUTLASS ones are "cutlass_grouped_<kernel>" (grouped_gemm_kernel_name).
nlohmann::json run_gemm_lab(const GemmLabOptions& options);

}  // namespace moeforge::cuda
