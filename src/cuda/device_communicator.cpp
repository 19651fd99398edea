// make_device_communicator: NCCL over a host group when every rank has a GPU of its own.
#include "cuda/device_communicator.h"

#include <algorithm>
#include <cstdint>

#include "comm/local_rank.h"
#include "cuda/cuda_check.h"
#if MOEFORGE_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace moeforge::cuda {

std::unique_ptr<Communicator> make_device_communicator([[maybe_unused]] Communicator& host,
                                                       [[maybe_unused]] cudaStream_t stream,
                                                       std::string* why_not) {
#if MOEFORGE_HAVE_NCCL
  int device_count = 0;
  MF_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  int32_t shared = std::max(local_rank_from_environment(), 0) >= device_count ? 1 : 0;
  host.all_reduce_sum(&shared, 1);
  if (shared > 0) {
    *why_not = "some ranks share a GPU";
    return nullptr;
  }
  auto nccl = std::make_unique<NcclCommunicator>(host);
  nccl->set_stream(stream);
  return nccl;
#else
  *why_not = "this build has no NCCL";
  return nullptr;
#endif
}

}  // namespace moeforge::cuda
