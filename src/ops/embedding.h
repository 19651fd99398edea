// Token embedding lookup.
#pragma once

#include <cstdint>

namespace moeforge::ops {

// out[n, c] = table[tokens[n], c]
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int64_t n, int64_t c);

// dtable[tokens[i], :] += dout[i, :]   (accumulate, rows visited in index order: deterministic)
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t c);

}  // namespace moeforge::ops
