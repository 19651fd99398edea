// The fp32 and bf16-compressed gradient all-reduce (see grad_reduce.h).
#include "train/grad_reduce.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "io/dtype.h"

namespace moeforge {

GradReduceDtype parse_grad_reduce_dtype(const std::string& name) {
  if (name == "fp32") return GradReduceDtype::kFloat32;
  if (name == "bf16") return GradReduceDtype::kBfloat16;
  MF_FAIL("unknown gradient reduction dtype \"{}\" (fp32, bf16)", name);
}

void all_reduce_gradients(float* data, size_t count, Communicator& comm, GradReduceDtype dtype) {
  const auto num_ranks = static_cast<size_t>(comm.size());
  if (num_ranks == 1 || count == 0) return;
  if (dtype == GradReduceDtype::kFloat32) {
    comm.all_reduce_sum(data, count);
    return;
  }
  const size_t chunk = (count + num_ranks - 1) / num_ranks;
  const std::vector<float> shard = reduce_scatter_gradients_bf16(data, count, comm);
  std::vector<float> full(chunk * num_ranks);
  comm.all_gather(shard.data(), full.data(), chunk);
  std::copy(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(count), data);
}

void all_reduce_gradient_ranges(float* data, const std::vector<ParamRange>& ranges,
                                Communicator& comm, GradReduceDtype dtype) {
  for (const ParamRange& r : ranges) {
    all_reduce_gradients(data + r.offset, static_cast<size_t>(r.count), comm, dtype);
  }
}

std::vector<float> reduce_scatter_gradients_bf16(const float* data, size_t count,
                                                 Communicator& comm) {
  const auto num_ranks = static_cast<size_t>(comm.size());
  const size_t chunk = (count + num_ranks - 1) / num_ranks;
  std::vector<uint16_t> send(chunk * num_ranks, 0), recv(chunk * num_ranks);
  for (size_t i = 0; i < count; ++i) send[i] = io::float_to_bf16(data[i]);
  comm.all_to_all(static_cast<const void*>(send.data()), static_cast<void*>(recv.data()),
                  chunk * sizeof(uint16_t), CommDType::kUInt8);
  std::vector<float> shard(chunk, 0.0f);
  for (size_t r = 0; r < num_ranks; ++r) {
    for (size_t i = 0; i < chunk; ++i) shard[i] += io::bf16_to_float(recv[r * chunk + i]);
  }
  return shard;
}

}  // namespace moeforge
