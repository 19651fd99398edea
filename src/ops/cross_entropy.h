// Softmax cross-entropy over the vocabulary, one row per token. Target -1 means "ignore".
#pragma once

#include <cstdint>

namespace moeforge::ops {

// logits [n, vocab]; targets [n]; losses [n] (0 for ignored rows). Returns the sum of losses
// (accumulated in double, in row order) and writes the number of counted rows to *num_counted.
template <typename T>
double cross_entropy_forward(T* losses, const T* logits, const int32_t* targets, int64_t n,
                             int64_t vocab, int64_t* num_counted);

// dlogits [n, vocab] = (softmax(logits) - onehot(target)) * dloss  (assign; 0 for ignored rows).
// dloss is the gradient of the final loss with respect to each row's loss (1/num_counted for a
// mean).
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* targets, int64_t n,
                            int64_t vocab, double dloss);

}  // namespace moeforge::ops
