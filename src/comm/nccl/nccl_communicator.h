// Communicator over NCCL: the collectives on device buffers, enqueued on a CUDA stream, plus
// MF_NCCL_CHECK, which turns NCCL result codes into moeforge::Error. Only built with MOEFORGE_NCCL.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace moeforge {

template <>
constexpr CommDType comm_dtype_of<__nv_bfloat16>() {
  return CommDType::kBFloat16;
}

// Throws moeforge::Error when result is not ncclSuccess: "<context>: <call> failed with NCCL error
// <code>: <ncclGetErrorString> (<ncclGetLastError>)", context omitted when empty.
void check_nccl(ncclResult_t result, const char* call, const char* file, int line,
                const std::string& context = {});

}  // namespace moeforge

#define MF_NCCL_CHECK(call) ::moeforge::check_nccl((call), #call, __FILE__, __LINE__)

namespace moeforge {

// All collectives of Communicator through NCCL, on device buffers of the communicator's CUDA
// device (cudaMalloc'd or managed memory; host pointers are rejected with an error).
//
// Streams and the host: every collective is enqueued on stream() and returns without waiting for
// the device, i.e. asynchronously with respect to the host. Buffers must stay allocated, and other
// streams must not touch them, until stream() has passed the collective. The host arguments
// (all_to_all_v's counts and offsets) are read before the call returns. barrier() and
// synchronize() block the host until stream() is idle. By default stream() is a stream the
// communicator creates with cudaStreamCreate: a blocking stream, ordered with the legacy default
// stream, so a synchronous cudaMemcpy before a collective and one after it (on stream 0) see
// the right data. set_stream() puts later collectives on the caller's stream (of the same device)
// instead, and the caller orders it against its own work; the communicator's own stream lives on
// until it is destroyed.
//
// Sums: NCCL picks the algorithm (ring, tree, ...) and with it the order of additions, so float
// sums can differ in the last bits from MpiCommunicator's rank-ordered sums, and between message
// sizes and rank counts. kBFloat16 sums are done in fp32 and rounded to bf16 at each reduction
// step. Integer sums are exact (uint8 wraps).
//
// Buffers: all_gather may be in place in NCCL's sense (send == recv + rank * count_per_rank),
// reduce_scatter_sum too (recv == send + rank * count_per_rank); otherwise send and recv must not
// overlap. Counts are elements, in size_t (no int limit). all_to_all(v) are grouped
// ncclSend/ncclRecv pairs; in all_to_all_v, send_counts[j] on rank i must equal recv_counts[i] on
// rank j (as in MPI: the ranks cannot check it without communicating, and a mismatch hangs or
// truncates). Zero counts send nothing; buffers of a call that moves nothing may be null.
//
// Failures: every NCCL and CUDA call is checked; the message names the collective, the rank, the
// group size and the device, and carries NCCL's error string and its last error message. Errors
// that NCCL meets while a collective runs on the device (a network peer that closed its
// connection, a remote error, a CUDA error in a proxy) are reported asynchronously through
// ncclCommGetAsyncError: every call checks it before enqueuing, and barrier() and synchronize()
// poll it while they wait. On such an error, or when the wait exceeds timeout() (default 10
// minutes), the communicator is aborted (ncclCommAbort, which also stops its kernels) and the call
// throws; every later call throws too. NCCL does not notice a peer process that died while the
// GPUs talk over NVLink, PCIe or shared memory (its kernels keep waiting for the peer's data), so
// there only the timeout ends the wait. Construction and split() block the host until every rank
// has joined, and so does the first collective of a kind on a communicator, for which NCCL (since
// 2.22) connects to the peers; after that a collective call does not wait for peers.
//
// Destruction: ncclCommDestroy (an intra-node collective: all ranks of a host destroy their
// communicators in the same order); ncclCommAbort instead, which is local, after an asynchronous
// error or while an exception unwinds the stack (a rank that throws must not wait for the others).
//
// Not thread-safe.
class NcclCommunicator final : public Communicator {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::minutes(10);

  // Collective over parent: rank 0 of parent creates NCCL's unique id and broadcasts it through
  // parent, and every rank joins with parent's rank and size on its current CUDA device. parent
  // must take host buffers (MpiCommunicator, SelfCommunicator), and is not used afterwards.
  explicit NcclCommunicator(Communicator& parent);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  int device() const { return device_; }
  // Null after the communicator was aborted.
  ncclComm_t nccl_comm() const { return comm_.get(); }

  cudaStream_t stream() const { return stream_; }
  // Later collectives go on `stream` (a stream of device(), or 0 for the legacy default stream).
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // How long barrier() and synchronize() wait before aborting; > 0. split() results inherit it.
  void set_timeout(std::chrono::milliseconds timeout);

  // Blocks until stream() has finished all work enqueued on it, polling NCCL's asynchronous error
  // state; aborts the communicator and throws on an error or after timeout().
  void synchronize();
  // Ends the communicator on this rank at once, without waiting for the others (ncclCommAbort:
  // stops its kernels and frees its resources), e.g. when another rank has failed; every later
  // call throws. Does nothing when it was aborted already.
  void abort();

  void all_reduce_sum(void* data, size_t count, CommDType dtype) override;
  void all_gather(const void* send, void* recv, size_t count_per_rank, CommDType dtype) override;
  void reduce_scatter_sum(const void* send, void* recv, size_t count_per_rank,
                          CommDType dtype) override;
  void all_to_all(const void* send, void* recv, size_t count_per_rank, CommDType dtype) override;
  void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                    void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                    CommDType dtype) override;
  void broadcast(void* data, size_t count, CommDType dtype, int root) override;
  // ncclReduce in place: NCCL's order of additions, as all_reduce_sum.
  void reduce_sum(void* data, size_t count, CommDType dtype, int root) override;
  // An all-reduce (max) of one int32 on stream(), then synchronize(): returns on a rank only once
  // every rank has entered the barrier (an empty ncclGroupStart/End would exchange nothing).
  void barrier() override;
  // ncclCommSplit (color >= 0): collective over this communicator; the result uses the same
  // device, has its own stream (created as above) and this communicator's timeout.
  std::unique_ptr<Communicator> split(int color, int key) override;
  using Communicator::all_gather;
  using Communicator::all_reduce_sum;
  using Communicator::all_to_all;
  using Communicator::broadcast;
  using Communicator::reduce_scatter_sum;
  using Communicator::reduce_sum;

 private:
  struct StreamDestroyer {
    void operator()(cudaStream_t stream) const;
  };
  struct DeviceFreer {
    void operator()(int32_t* ptr) const;
  };
  // ncclCommDestroy, or ncclCommAbort during stack unwinding or after an asynchronous error.
  struct CommCloser {
    void operator()(ncclComm_t comm) const;
  };

  // Adopts a communicator made by ncclCommSplit.
  NcclCommunicator(ncclComm_t comm, int device, std::chrono::milliseconds timeout);
  // The stream, the barrier's scratch element, rank and size; comm_ must be set for the latter.
  void create_stream_and_scratch();
  void query_rank_and_size();

  // "NcclCommunicator::<op> (rank r of n, device d)", the context of every error message.
  std::string context(const char* op) const;
  // Throws when the communicator was aborted; aborts it and throws on an asynchronous error.
  void check_healthy(const char* op);
  [[noreturn]] void abort_and_throw(const char* op, const std::string& reason);
  // Throws unless ptr is device memory of device() (or managed memory).
  void check_device_buffer(const char* op, const char* what, const void* ptr) const;
  // all_gather / reduce_scatter_sum: throws if the rank's chunk (count_per_rank elements) and the
  // whole buffer (size() chunks) overlap other than in NCCL's in-place form, chunk == full + rank
  // * count_per_rank.
  void check_rank_chunk(const char* op, const void* chunk, const char* chunk_name, const void* full,
                        const char* full_name, size_t count_per_rank, CommDType dtype) const;
  // all_to_all and all_to_all_v: one group of ncclSend/ncclRecv, named op in errors.
  void exchange(const char* op, const void* send, const size_t* send_counts,
                const size_t* send_offsets, void* recv, const size_t* recv_counts,
                const size_t* recv_offsets, CommDType dtype);
  // Blocks until stream_ is idle; see synchronize().
  void wait_for_stream(const char* op);

  int device_ = -1;
  int rank_ = 0;
  int size_ = 1;
  std::chrono::milliseconds timeout_ = kDefaultTimeout;
  std::string abort_reason_;  // set once the communicator was aborted
  std::unique_ptr<CUstream_st, StreamDestroyer> own_stream_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<int32_t, DeviceFreer> barrier_scratch_;  // [1]
  // Declared last, so it is closed before the stream it may still use is destroyed.
  std::unique_ptr<ncclComm, CommCloser> comm_;
};

}  // namespace moeforge
