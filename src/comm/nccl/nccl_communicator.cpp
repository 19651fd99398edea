// NcclCommunicator: the Communicator collectives through NCCL on a CUDA stream, bootstrapped from
// a host communicator, with NCCL's asynchronous errors polled while waiting.
#include "comm/nccl/nccl_communicator.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "NcclCommunicator needs NCCL >= 2.18 (ncclCommSplit); configure with -DMOEFORGE_NCCL=OFF"
#endif

// Inside NcclCommunicator: checks an NCCL call of the operation `op`, naming op, rank and size.
#define MF_NCCL_CHECK_OP(op, call) \
  ::moeforge::check_nccl((call), #call, __FILE__, __LINE__, context(op))

namespace moeforge {

void check_nccl(ncclResult_t result, const char* call, const char* file, int line,
                const std::string& context) {
  if (result == ncclSuccess) return;
  const char* last_error = ncclGetLastError(nullptr);
  throw_error(
      file, line,
      fmt::format(
          "{}{}{} failed with NCCL error {}: {} ({})", context, context.empty() ? "" : ": ", call,
          static_cast<int>(result), ncclGetErrorString(result),
          last_error != nullptr && last_error[0] != '\0' ? last_error : "no further detail"));
}

namespace {

ncclDataType_t nccl_datatype(CommDType dtype) {
  switch (dtype) {
    case CommDType::kFloat32: return ncclFloat32;
    case CommDType::kFloat64: return ncclFloat64;
    case CommDType::kInt32: return ncclInt32;
    case CommDType::kInt64: return ncclInt64;
    case CommDType::kUInt8: return ncclUint8;
    case CommDType::kBFloat16: return ncclBfloat16;
  }
  MF_FAIL("unknown CommDType {}", static_cast<int>(dtype));
}

bool ranges_overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  const auto* a_begin = static_cast<const std::byte*>(a);
  const auto* b_begin = static_cast<const std::byte*>(b);
  return a_begin < b_begin + b_bytes && b_begin < a_begin + a_bytes;
}

// The elements [0, extent) that a rank's chunks of all_to_all_v cover.
size_t chunks_extent(const size_t* counts, const size_t* offsets, int num_ranks) {
  size_t extent = 0;
  for (int peer_idx = 0; peer_idx < num_ranks; ++peer_idx) {
    if (counts[peer_idx] > 0) extent = std::max(extent, offsets[peer_idx] + counts[peer_idx]);
  }
  return extent;
}

const std::byte* byte_offset(const void* base, size_t count, size_t elem_bytes) {
  return static_cast<const std::byte*>(base) + count * elem_bytes;
}

std::byte* byte_offset(void* base, size_t count, size_t elem_bytes) {
  return static_cast<std::byte*>(base) + count * elem_bytes;
}

}  // namespace

void NcclCommunicator::StreamDestroyer::operator()(cudaStream_t stream) const {
  cudaStreamDestroy(stream);
}

void NcclCommunicator::DeviceFreer::operator()(int32_t* ptr) const {
  cudaFree(ptr);
}

void NcclCommunicator::CommCloser::operator()(ncclComm_t comm) const {
  ncclResult_t async_error = ncclSuccess;
  const ncclResult_t query = ncclCommGetAsyncError(comm, &async_error);
  if (std::uncaught_exceptions() > 0 || query != ncclSuccess || async_error != ncclSuccess) {
    ncclCommAbort(comm);
  } else {
    ncclCommDestroy(comm);
  }
}

NcclCommunicator::NcclCommunicator(Communicator& parent) {
  MF_CHECK(dynamic_cast<NcclCommunicator*>(&parent) == nullptr,
           "NcclCommunicator: the parent communicator must take host buffers (MPI or self), not "
           "another NcclCommunicator; use split() to make sub-groups of an NCCL communicator");
  MF_CUDA_CHECK(cudaGetDevice(&device_));
  rank_ = parent.rank();
  size_ = parent.size();
  create_stream_and_scratch();

  // [ok flag, ncclUniqueId]: rank 0 always broadcasts, so that a failure there does not leave
  // the other ranks waiting for an id.
  std::array<uint8_t, 1 + sizeof(ncclUniqueId)> message{};
  ncclUniqueId unique_id{};
  ncclResult_t id_result = ncclSuccess;
  if (parent.rank() == 0) {
    id_result = ncclGetUniqueId(&unique_id);
    message[0] = id_result == ncclSuccess ? 1 : 0;
    std::memcpy(message.data() + 1, &unique_id, sizeof(unique_id));
  }
  parent.broadcast(message.data(), message.size(), /*root=*/0);
  if (parent.rank() == 0) {
    check_nccl(id_result, "ncclGetUniqueId(&unique_id)", __FILE__, __LINE__, context("bootstrap"));
  }
  MF_CHECK(message[0] == 1,
           "{}: rank 0 of the parent communicator could not create NCCL's unique id (its error "
           "says why)",
           context("bootstrap"));
  std::memcpy(&unique_id, message.data() + 1, sizeof(unique_id));

  ncclComm_t comm = nullptr;
  MF_NCCL_CHECK_OP("bootstrap", ncclCommInitRank(&comm, size_, unique_id, rank_));
  comm_.reset(comm);
  query_rank_and_size();
  MF_CHECK(rank_ == parent.rank() && size_ == parent.size(),
           "{}: NCCL reports rank {} of {}, but the parent communicator has rank {} of {}",
           context("bootstrap"), rank_, size_, parent.rank(), parent.size());
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, int device, std::chrono::milliseconds timeout)
    : device_(device), timeout_(timeout) {
  comm_.reset(comm);
  query_rank_and_size();
  create_stream_and_scratch();
}

NcclCommunicator::~NcclCommunicator() = default;

void NcclCommunicator::create_stream_and_scratch() {
  cudaStream_t stream = nullptr;
  MF_CUDA_CHECK(cudaStreamCreate(&stream));
  own_stream_.reset(stream);
  stream_ = stream;
  int32_t* scratch = nullptr;
  MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scratch), sizeof(int32_t)));
  barrier_scratch_.reset(scratch);
  MF_CUDA_CHECK(cudaMemsetAsync(scratch, 0, sizeof(int32_t), stream));
  MF_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void NcclCommunicator::query_rank_and_size() {
  MF_NCCL_CHECK_OP("query", ncclCommUserRank(comm_.get(), &rank_));
  MF_NCCL_CHECK_OP("query", ncclCommCount(comm_.get(), &size_));
}

void NcclCommunicator::set_timeout(std::chrono::milliseconds timeout) {
  MF_CHECK(timeout.count() > 0, "NcclCommunicator::set_timeout: timeout must be > 0 ms, got {}",
           timeout.count());
  timeout_ = timeout;
}

std::string NcclCommunicator::context(const char* op) const {
  return fmt::format("NcclCommunicator::{} (rank {} of {}, device {})", op, rank_, size_, device_);
}

void NcclCommunicator::check_healthy(const char* op) {
  MF_CHECK(comm_ != nullptr, "{}: the communicator was aborted after an earlier failure: {}",
           context(op), abort_reason_);
  ncclResult_t async_error = ncclSuccess;
  MF_NCCL_CHECK_OP(op, ncclCommGetAsyncError(comm_.get(), &async_error));
  if (async_error != ncclSuccess) {
    abort_and_throw(op,
                    fmt::format("NCCL reported an asynchronous error: {} ({})",
                                ncclGetErrorString(async_error), ncclGetLastError(comm_.get())));
  }
}

void NcclCommunicator::abort() {
  if (comm_ == nullptr) return;
  abort_reason_ = "abort() was called";
  ncclCommAbort(comm_.release());
}

void NcclCommunicator::abort_and_throw(const char* op, const std::string& reason) {
  abort_reason_ = reason;
  ncclCommAbort(comm_.release());
  MF_FAIL("{}: {}; the communicator was aborted (ncclCommAbort), the job should end", context(op),
          reason);
}

void NcclCommunicator::check_device_buffer(const char* op, const char* what,
                                           const void* ptr) const {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, ptr);
  if (status != cudaSuccess) cudaGetLastError();  // clear the error, report below
  const bool on_device = status == cudaSuccess && (attributes.type == cudaMemoryTypeDevice ||
                                                   attributes.type == cudaMemoryTypeManaged);
  MF_CHECK(on_device,
           "{}: {} buffer {} is not device memory (CUDA memory type {}); NCCL collectives take "
           "device buffers",
           context(op), what, ptr, status == cudaSuccess ? static_cast<int>(attributes.type) : -1);
  MF_CHECK(attributes.type == cudaMemoryTypeManaged || attributes.device == device_,
           "{}: {} buffer {} is on device {}, but the communicator uses device {}", context(op),
           what, ptr, attributes.device, device_);
}

void NcclCommunicator::wait_for_stream(const char* op) {
  check_healthy(op);
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  std::chrono::microseconds pause(1);
  for (;;) {
    const cudaError_t status = cudaStreamQuery(stream_);
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) {
      abort_and_throw(op, fmt::format("waiting for the stream failed with CUDA error {} ({})",
                                      cudaGetErrorString(status), cudaGetErrorName(status)));
    }
    check_healthy(op);
    if (Clock::now() - start > timeout_) {
      abort_and_throw(op, fmt::format("the stream did not finish within the timeout of {} ms "
                                      "(a peer may have died or stopped calling collectives)",
                                      timeout_.count()));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
  check_healthy(op);
}

void NcclCommunicator::synchronize() {
  wait_for_stream("synchronize");
}

void NcclCommunicator::all_reduce_sum(void* data, size_t count, CommDType dtype) {
  check_healthy("all_reduce_sum");
  if (count == 0) return;
  check_device_buffer("all_reduce_sum", "data", data);
  MF_NCCL_CHECK_OP("all_reduce_sum", ncclAllReduce(data, data, count, nccl_datatype(dtype), ncclSum,
                                                   comm_.get(), stream_));
}

void NcclCommunicator::check_rank_chunk(const char* op, const void* chunk, const char* chunk_name,
                                        const void* full, const char* full_name,
                                        size_t count_per_rank, CommDType dtype) const {
  const size_t elem_bytes = comm_dtype_size(dtype);
  const size_t chunk_bytes = count_per_rank * elem_bytes;
  const bool in_place = chunk == byte_offset(full, count_per_rank * rank_, elem_bytes);
  MF_CHECK(in_place || !ranges_overlap(chunk, chunk_bytes, full, chunk_bytes * size_),
           "{}: send and recv overlap; use distinct buffers or the in-place form {} == {} + "
           "rank * count_per_rank",
           context(op), chunk_name, full_name);
}

void NcclCommunicator::all_gather(const void* send, void* recv, size_t count_per_rank,
                                  CommDType dtype) {
  check_healthy("all_gather");
  if (count_per_rank == 0) return;
  check_device_buffer("all_gather", "send", send);
  check_device_buffer("all_gather", "recv", recv);
  check_rank_chunk("all_gather", send, "send", recv, "recv", count_per_rank, dtype);
  MF_NCCL_CHECK_OP("all_gather", ncclAllGather(send, recv, count_per_rank, nccl_datatype(dtype),
                                               comm_.get(), stream_));
}

void NcclCommunicator::reduce_scatter_sum(const void* send, void* recv, size_t count_per_rank,
                                          CommDType dtype) {
  check_healthy("reduce_scatter_sum");
  if (count_per_rank == 0) return;
  check_device_buffer("reduce_scatter_sum", "send", send);
  check_device_buffer("reduce_scatter_sum", "recv", recv);
  check_rank_chunk("reduce_scatter_sum", recv, "recv", send, "send", count_per_rank, dtype);
  MF_NCCL_CHECK_OP("reduce_scatter_sum",
                   ncclReduceScatter(send, recv, count_per_rank, nccl_datatype(dtype), ncclSum,
                                     comm_.get(), stream_));
}

void NcclCommunicator::all_to_all(const void* send, void* recv, size_t count_per_rank,
                                  CommDType dtype) {
  const std::vector<size_t> counts(size_, count_per_rank);
  std::vector<size_t> offsets(size_);
  for (int peer_idx = 0; peer_idx < size_; ++peer_idx) {
    offsets[peer_idx] = static_cast<size_t>(peer_idx) * count_per_rank;
  }
  exchange("all_to_all", send, counts.data(), offsets.data(), recv, counts.data(), offsets.data(),
           dtype);
}

void NcclCommunicator::all_to_all_v(const void* send, const size_t* send_counts,
                                    const size_t* send_offsets, void* recv,
                                    const size_t* recv_counts, const size_t* recv_offsets,
                                    CommDType dtype) {
  exchange("all_to_all_v", send, send_counts, send_offsets, recv, recv_counts, recv_offsets, dtype);
}

void NcclCommunicator::exchange(const char* op, const void* send, const size_t* send_counts,
                                const size_t* send_offsets, void* recv, const size_t* recv_counts,
                                const size_t* recv_offsets, CommDType dtype) {
  check_healthy(op);
  const size_t elem_bytes = comm_dtype_size(dtype);
  const size_t send_extent = chunks_extent(send_counts, send_offsets, size_);
  const size_t recv_extent = chunks_extent(recv_counts, recv_offsets, size_);
  if (send_extent > 0) check_device_buffer(op, "send", send);
  if (recv_extent > 0) check_device_buffer(op, "recv", recv);
  MF_CHECK(!ranges_overlap(send, send_extent * elem_bytes, recv, recv_extent * elem_bytes),
           "{}: send and recv buffers overlap; use distinct buffers", context(op));
  if (send_extent == 0 && recv_extent == 0) return;

  // Every send and receive of the exchange in one group: NCCL starts them together, so their
  // order does not matter and none waits for another. The group is always closed, also when a
  // call inside it fails, and the first failure is reported.
  const ncclDataType_t nccl_type = nccl_datatype(dtype);
  MF_NCCL_CHECK_OP(op, ncclGroupStart());
  ncclResult_t result = ncclSuccess;
  const char* failed_call = "";
  for (int peer_idx = 0; peer_idx < size_ && result == ncclSuccess; ++peer_idx) {
    if (send_counts[peer_idx] > 0) {
      result = ncclSend(byte_offset(send, send_offsets[peer_idx], elem_bytes),
                        send_counts[peer_idx], nccl_type, peer_idx, comm_.get(), stream_);
      failed_call = "ncclSend(send + send_offsets[peer], send_counts[peer], dtype, peer, ...)";
    }
    if (result == ncclSuccess && recv_counts[peer_idx] > 0) {
      result = ncclRecv(byte_offset(recv, recv_offsets[peer_idx], elem_bytes),
                        recv_counts[peer_idx], nccl_type, peer_idx, comm_.get(), stream_);
      failed_call = "ncclRecv(recv + recv_offsets[peer], recv_counts[peer], dtype, peer, ...)";
    }
  }
  const ncclResult_t end_result = ncclGroupEnd();
  check_nccl(result, failed_call, __FILE__, __LINE__, context(op));
  check_nccl(end_result, "ncclGroupEnd()", __FILE__, __LINE__, context(op));
}

void NcclCommunicator::broadcast(void* data, size_t count, CommDType dtype, int root) {
  check_healthy("broadcast");
  MF_CHECK(root >= 0 && root < size_, "{}: root {} is not a rank of this communicator of size {}",
           context("broadcast"), root, size_);
  if (count == 0) return;
  check_device_buffer("broadcast", "data", data);
  MF_NCCL_CHECK_OP("broadcast", ncclBroadcast(data, data, count, nccl_datatype(dtype), root,
                                              comm_.get(), stream_));
}

void NcclCommunicator::reduce_sum(void* data, size_t count, CommDType dtype, int root) {
  check_healthy("reduce_sum");
  MF_CHECK(root >= 0 && root < size_, "{}: root {} is not a rank of this communicator of size {}",
           context("reduce_sum"), root, size_);
  if (count == 0) return;
  check_device_buffer("reduce_sum", "data", data);
  MF_NCCL_CHECK_OP("reduce_sum", ncclReduce(data, data, count, nccl_datatype(dtype), ncclSum, root,
                                            comm_.get(), stream_));
}

void NcclCommunicator::barrier() {
  check_healthy("barrier");
  MF_NCCL_CHECK_OP("barrier", ncclAllReduce(barrier_scratch_.get(), barrier_scratch_.get(), 1,
                                            ncclInt32, ncclMax, comm_.get(), stream_));
  wait_for_stream("barrier");
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  MF_CHECK(color >= 0, "{}: color must be >= 0, got {}", context("split"), color);
  check_healthy("split");
  ncclComm_t sub_comm = nullptr;
  MF_NCCL_CHECK_OP("split", ncclCommSplit(comm_.get(), color, key, &sub_comm, /*config=*/nullptr));
  MF_CHECK(sub_comm != nullptr, "{}: ncclCommSplit returned no communicator for color {}",
           context("split"), color);
  return std::unique_ptr<Communicator>(new NcclCommunicator(sub_comm, device_, timeout_));
}

}  // namespace moeforge
