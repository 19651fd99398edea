// The CUDA backend's model layout decisions (see model_support.h).
#include "cuda/model_support.h"

namespace moeforge::cuda {

bool packed_qkv(const ModelConfig& config, const LayerOffsets& o) {
  const int64_t qd = config.q_dim(), kvd = config.kv_dim(), h = config.hidden_size;
  const bool weights_adjacent = o.k_proj == o.q_proj + qd * h && o.v_proj == o.k_proj + kvd * h;
  const bool biases_adjacent =
      !config.attention_bias || (o.k_bias == o.q_bias + qd && o.v_bias == o.k_bias + kvd);
  return !config.qk_norm && weights_adjacent && biases_adjacent;
}

}  // namespace moeforge::cuda
