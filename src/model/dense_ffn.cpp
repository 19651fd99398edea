// Dense SwiGLU FFN forward and backward, composed from the linear and SwiGLU ops.
#include "model/dense_ffn.h"

#include "core/error.h"
#include "ops/linear.h"
#include "ops/swiglu.h"

namespace moeforge {

template <typename T>
void dense_ffn_forward(T* out, DenseFfnSaved<T>& saved, const T* inp, const T* gate_proj,
                       const T* up_proj, const T* down_proj, int64_t num_tokens, int64_t hidden,
                       int64_t ffn) {
  MF_CHECK(num_tokens >= 0 && hidden >= 1 && ffn >= 1,
           "dense_ffn: invalid dims num_tokens {}, hidden {}, ffn {}", num_tokens, hidden, ffn);
  const size_t size = static_cast<size_t>(num_tokens * ffn);
  saved.h_gate.resize(size);
  saved.h_up.resize(size);
  saved.h_act.resize(size);
  ops::linear_forward<T>(saved.h_gate.data(), inp, gate_proj, nullptr, num_tokens, hidden, ffn);
  ops::linear_forward<T>(saved.h_up.data(), inp, up_proj, nullptr, num_tokens, hidden, ffn);
  ops::swiglu_forward<T>(saved.h_act.data(), saved.h_gate.data(), saved.h_up.data(),
                         num_tokens * ffn);
  ops::linear_forward<T>(out, saved.h_act.data(), down_proj, nullptr, num_tokens, ffn, hidden);
}

template <typename T>
void dense_ffn_backward(T* dinp, T* dgate_proj, T* dup_proj, T* ddown_proj, const T* dout,
                        const T* inp, const DenseFfnSaved<T>& saved, const T* gate_proj,
                        const T* up_proj, const T* down_proj, int64_t num_tokens, int64_t hidden,
                        int64_t ffn) {
  const size_t size = static_cast<size_t>(num_tokens * ffn);
  MF_CHECK(saved.h_act.size() == size,
           "dense_ffn_backward: saved activations hold {} values, expected num_tokens {} x ffn {}",
           saved.h_act.size(), num_tokens, ffn);
  std::vector<T> dh_act(size);   // [num_tokens, ffn]
  std::vector<T> dh_gate(size);  // [num_tokens, ffn]
  std::vector<T> dh_up(size);    // [num_tokens, ffn]
  ops::linear_backward<T>(dh_act.data(), ddown_proj, nullptr, dout, saved.h_act.data(), down_proj,
                          num_tokens, ffn, hidden);
  ops::swiglu_backward<T>(dh_gate.data(), dh_up.data(), dh_act.data(), saved.h_gate.data(),
                          saved.h_up.data(), num_tokens * ffn);
  std::vector<T> dinp_up(static_cast<size_t>(num_tokens * hidden));  // [num_tokens, hidden]
  ops::linear_backward<T>(dinp, dgate_proj, nullptr, dh_gate.data(), inp, gate_proj, num_tokens,
                          hidden, ffn);
  ops::linear_backward<T>(dinp_up.data(), dup_proj, nullptr, dh_up.data(), inp, up_proj, num_tokens,
                          hidden, ffn);
  for (size_t i = 0; i < dinp_up.size(); ++i) dinp[i] += dinp_up[i];
}

#define MOEFORGE_INSTANTIATE_DENSE_FFN(T)                                                          \
  template void dense_ffn_forward<T>(T*, DenseFfnSaved<T>&, const T*, const T*, const T*,          \
                                     const T*, int64_t, int64_t, int64_t);                         \
  template void dense_ffn_backward<T>(T*, T*, T*, T*, const T*, const T*, const DenseFfnSaved<T>&, \
                                      const T*, const T*, const T*, int64_t, int64_t, int64_t);
MOEFORGE_INSTANTIATE_DENSE_FFN(float)
MOEFORGE_INSTANTIATE_DENSE_FFN(double)
#undef MOEFORGE_INSTANTIATE_DENSE_FFN

}  // namespace moeforge
