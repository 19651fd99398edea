// Puts a sharded model's flat buffers together on one rank (see expert_shards.h).
#include "train/expert_shards.h"

#include <algorithm>

#include "core/error.h"

namespace moeforge {

namespace {

// Copies every tensor of `from` (values in its order) to the same name in `whole`.
void place_by_name(const ParameterLayout& from, const float* values, const ParameterLayout& whole,
                   float* out) {
  for (const ParamSpec& spec : from.specs()) {
    const ParamSpec* target = whole.find(spec.name);
    MF_CHECK(target != nullptr && target->numel == spec.numel,
             "tensor {} of an expert shard is not in the whole model's layout", spec.name);
    std::copy(values + spec.offset, values + spec.offset + spec.numel, out + target->offset);
  }
}

// Copies the expert tensors of `from` from packed (its expert ranges one after another) to the
// same names in `whole`.
void place_packed_experts(const ParameterLayout& from, const float* packed,
                          const ParameterLayout& whole, float* out) {
  int64_t range_start = 0;  // where the current expert range begins in packed
  for (const ParamRange& r : from.expert_ranges()) {
    for (const ParamSpec& spec : from.specs()) {
      if (spec.offset < r.offset || spec.offset >= r.offset + r.count) continue;
      const ParamSpec* target = whole.find(spec.name);
      MF_CHECK(target != nullptr && target->numel == spec.numel,
               "tensor {} of an expert shard is not in the whole model's layout", spec.name);
      const float* values = packed + range_start + (spec.offset - r.offset);
      std::copy(values, values + spec.numel, out + target->offset);
    }
    range_start += r.count;
  }
}

}  // namespace

std::vector<float> gather_expert_shards(const ParameterLayout& layout, const float* local,
                                        Communicator& group) {
  if (!layout.experts_sharded()) {
    return group.rank() == 0 ? std::vector<float>(local, local + layout.num_params())
                             : std::vector<float>();
  }
  const int64_t n = layout.expert_shard().size;
  MF_CHECK(group.size() == n && group.rank() == layout.expert_shard().rank,
           "gathering expert shards: rank {} of a group of {} holds shard {} of {}", group.rank(),
           group.size(), layout.expert_shard().rank, n);
  const ParameterLayout whole(layout.config());
  std::vector<float> out;
  if (group.rank() == 0) {
    out.assign(static_cast<size_t>(whole.num_params()), 0.0f);
    place_by_name(layout, local, whole, out.data());
  }
  // Every shard's experts lie at the same offsets of its buffer (the shards have equal sizes), so
  // the source's expert ranges are packed and sent whole, one source at a time.
  int64_t packed_size = 0;
  for (const ParamRange& r : layout.expert_ranges()) packed_size += r.count;
  std::vector<float> packed(static_cast<size_t>(packed_size));
  for (int src = 1; src < n; ++src) {
    if (group.rank() == src) {
      int64_t at = 0;
      for (const ParamRange& r : layout.expert_ranges()) {
        std::copy(local + r.offset, local + r.offset + r.count, packed.begin() + at);
        at += r.count;
      }
    }
    group.broadcast(packed.data(), packed.size(), src);
    if (group.rank() == 0) {
      place_packed_experts(ParameterLayout(layout.config(), {src, n}), packed.data(), whole,
                           out.data());
    }
  }
  return out;
}

}  // namespace moeforge
