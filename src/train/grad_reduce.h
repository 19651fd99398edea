// Gradient sums over ranks, in full precision or compressed as in MegaScale-MoE section 3: each
// rank casts its fp32 gradient once to bf16 and exchanges it with an all-to-all, so rank r
// receives every rank's bf16 copy of chunk r and sums them locally in fp32 in rank order (no
// repeated bf16 accumulation); the summed fp32 chunks are then all-gathered. Traffic: 2 bytes per
// element through the all-to-all plus 4 through the all-gather, against 8 for a ring all-reduce in
// fp32. With one rank nothing is exchanged and the gradient is unchanged.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/param_range.h"

namespace moeforge {

enum class GradReduceDtype { kFloat32, kBfloat16 };

// "fp32" or "bf16"; throws naming the value otherwise.
GradReduceDtype parse_grad_reduce_dtype(const std::string& name);

// data[i] = sum over the ranks of comm of data[i], in place, on every rank. kFloat32: the
// communicator's rank-order all-reduce. kBfloat16: as above; element i becomes
// fl32(sum over ranks r in order of bf16(data_r[i])), the same on every rank.
void all_reduce_gradients(float* data, size_t count, Communicator& comm, GradReduceDtype dtype);

// all_reduce_gradients of each of the ranges of data (the parts of a flat gradient buffer summed
// over one group, e.g. a model's replicated ranges over the world when its experts are sharded).
void all_reduce_gradient_ranges(float* data, const std::vector<ParamRange>& ranges,
                                Communicator& comm, GradReduceDtype dtype);

// The bf16 path's first half: this rank's chunk [rank * len, (rank + 1) * len) of the sum, len =
// ceil(count / size), as fp32 (elements past count are zero). ZeRO-1 stops here.
std::vector<float> reduce_scatter_gradients_bf16(const float* data, size_t count,
                                                 Communicator& comm);

}  // namespace moeforge
