// Dense SwiGLU FFN (Llama MLP): out = down(silu(gate(x)) * up(x)). Used by dense layers and,
// through moe_ffn, by the shared expert.
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge {

template <typename T>
struct DenseFfnSaved {
  std::vector<T> h_gate;  // [num_tokens, ffn]
  std::vector<T> h_up;    // [num_tokens, ffn]
  std::vector<T> h_act;   // [num_tokens, ffn]
};

// weights: gate_proj [ffn, hidden], up_proj [ffn, hidden], down_proj [hidden, ffn].
template <typename T>
void dense_ffn_forward(T* out, DenseFfnSaved<T>& saved, const T* inp, const T* gate_proj,
                       const T* up_proj, const T* down_proj, int64_t num_tokens, int64_t hidden,
                       int64_t ffn);

// dinp (assign); weight gradients accumulate.
template <typename T>
void dense_ffn_backward(T* dinp, T* dgate_proj, T* dup_proj, T* ddown_proj, const T* dout,
                        const T* inp, const DenseFfnSaved<T>& saved, const T* gate_proj,
                        const T* up_proj, const T* down_proj, int64_t num_tokens, int64_t hidden,
                        int64_t ffn);

}  // namespace moeforge
