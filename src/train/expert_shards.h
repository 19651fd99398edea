// Checkpoints of a model whose experts are sharded over its expert group (expert parallelism,
// ParameterLayout's ExpertShard): the whole model's flat buffers put together on one rank from
// every rank's shard, so that a checkpoint holds every tensor in the HF layout whatever the
// parallel layout it was trained under. Loading needs no exchange: each rank reads its own tensors.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "model/parameters.h"

namespace moeforge {

// Collective over group, the ranks holding shards 0..n-1 of layout's experts in rank order
// (layout is this rank's shard). On group rank 0: the whole model's buffer, in the order of
// ParameterLayout(layout.config()), made of local [layout.num_params()] (its replicated tensors
// and its experts) and every other rank's experts; elsewhere empty. Without sharded experts:
// local itself on rank 0.
std::vector<float> gather_expert_shards(const ParameterLayout& layout, const float* local,
                                        Communicator& group);

}  // namespace moeforge
