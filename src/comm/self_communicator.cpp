// The single-rank communicator: collectives over one rank are copies.
#include <cstring>

#include "comm/communicator.h"
#include "core/error.h"

namespace moeforge {

size_t comm_dtype_size(CommDType dtype) {
  switch (dtype) {
    case CommDType::kFloat32: return 4;
    case CommDType::kFloat64: return 8;
    case CommDType::kInt32: return 4;
    case CommDType::kInt64: return 8;
    case CommDType::kUInt8: return 1;
    case CommDType::kBFloat16: return 2;
  }
  MF_FAIL("unknown CommDType {}", static_cast<int>(dtype));
}

static void copy_if_distinct(const void* send, void* recv, size_t bytes) {
  if (send != recv && bytes > 0) std::memmove(recv, send, bytes);
}

void SelfCommunicator::all_gather(const void* send, void* recv, size_t count, CommDType dtype) {
  copy_if_distinct(send, recv, count * comm_dtype_size(dtype));
}

void SelfCommunicator::reduce_scatter_sum(const void* send, void* recv, size_t count,
                                          CommDType dtype) {
  copy_if_distinct(send, recv, count * comm_dtype_size(dtype));
}

void SelfCommunicator::all_to_all(const void* send, void* recv, size_t count, CommDType dtype) {
  copy_if_distinct(send, recv, count * comm_dtype_size(dtype));
}

void SelfCommunicator::all_to_all_v(const void* send, const size_t* send_counts,
                                    const size_t* send_offsets, void* recv,
                                    const size_t* recv_counts, const size_t* recv_offsets,
                                    CommDType dtype) {
  MF_CHECK(send_counts[0] == recv_counts[0],
           "all_to_all_v on one rank: send count {} != recv count {}", send_counts[0],
           recv_counts[0]);
  const size_t elem = comm_dtype_size(dtype);
  copy_if_distinct(static_cast<const char*>(send) + send_offsets[0] * elem,
                   static_cast<char*>(recv) + recv_offsets[0] * elem, send_counts[0] * elem);
}

void SelfCommunicator::reduce_sum(void*, size_t, CommDType, int root) {
  MF_CHECK(root == 0, "reduce_sum on one rank: root {} is not rank 0", root);
}

std::unique_ptr<Communicator> SelfCommunicator::split(int, int) {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace moeforge
