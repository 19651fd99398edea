// Communicator over an MPI communicator (CPU host buffers), plus MF_MPI_CHECK, which turns MPI
// error codes into moeforge::Error. Only compiled when MOEFORGE_MPI=ON.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"

namespace moeforge {

// Throws moeforge::Error naming the MPI call and MPI's message when `code` is not MPI_SUCCESS.
void check_mpi(int code, const char* call, const char* file, int line);

}  // namespace moeforge

// MF_MPI_CHECK(MPI_Xxx(...)): the communicator must have MPI_ERRORS_RETURN set, otherwise MPI
// aborts the job before an error code comes back.
#define MF_MPI_CHECK(call) ::moeforge::check_mpi((call), #call, __FILE__, __LINE__)

namespace moeforge {

// Whether the MpiCommunicator frees its MPI_Comm on destruction (split results) or not (world).
enum class MpiCommOwnership { kBorrowed, kOwned };

// All collectives of Communicator through MPI. Sets MPI_ERRORS_RETURN on the wrapped
// communicator, so failures throw moeforge::Error instead of aborting the job.
//
// Determinism: MPI_SUM on floating-point data may add in any order (it depends on the algorithm
// MPI picks for the message size and rank count), so the sums could differ between ranks and
// between runs. all_reduce_sum and reduce_scatter_sum on kFloat32/kFloat64 therefore never use
// MPI's reduction: the contributions are exchanged with all-to-all and each element is summed
// locally in rank order, ((x_0 + x_1) + x_2) + ... + x_{n-1}. all_reduce_sum then all-gathers the
// reduced chunks, so every rank holds bit-identical sums that only depend on the inputs and the
// rank count. kBFloat16 takes the same path (MPI has no bf16 sum): each element is summed in fp32
// in rank order and rounded to bf16 (nearest even) once. Integer sums are exact and use
// MPI_Allreduce / MPI_Reduce_scatter_block.
//
// Counts: MPI 3.1 counts and displacements are int. all_reduce_sum and broadcast split larger
// buffers into calls of at most max_count_per_call elements; the other collectives throw when a
// count or offset does not fit in an int. Send and receive buffers must not overlap.
//
// Not thread-safe: call from the thread that initialised MPI (MPI_THREAD_FUNNELED).
class MpiCommunicator final : public Communicator {
 public:
  static constexpr size_t kMaxMpiCount = INT_MAX;

  // max_count_per_call (1..kMaxMpiCount) bounds the elements per MPI call in all_reduce_sum and
  // broadcast; lower values exist to test the splitting.
  MpiCommunicator(MPI_Comm comm, MpiCommOwnership ownership,
                  size_t max_count_per_call = kMaxMpiCount);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  MPI_Comm mpi_comm() const { return comm_; }

  void all_reduce_sum(void* data, size_t count, CommDType dtype) override;
  void all_gather(const void* send, void* recv, size_t count_per_rank, CommDType dtype) override;
  void reduce_scatter_sum(const void* send, void* recv, size_t count_per_rank,
                          CommDType dtype) override;
  void all_to_all(const void* send, void* recv, size_t count_per_rank, CommDType dtype) override;
  void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                    void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                    CommDType dtype) override;
  void broadcast(void* data, size_t count, CommDType dtype, int root) override;
  // Floating point: every rank's data gathered on root and summed there in rank order (as the
  // other sums); integers: MPI_Reduce.
  void reduce_sum(void* data, size_t count, CommDType dtype, int root) override;
  void barrier() override;
  // color >= 0; the result owns its MPI_Comm and keeps max_count_per_call.
  std::unique_ptr<Communicator> split(int color, int key) override;
  using Communicator::all_gather;
  using Communicator::all_reduce_sum;
  using Communicator::all_to_all;
  using Communicator::broadcast;
  using Communicator::reduce_scatter_sum;
  using Communicator::reduce_sum;

 private:
  // Rank-ordered floating-point sum of one segment of at most max_count_per_call_ elements.
  void all_reduce_sum_ordered(void* data, size_t count, CommDType dtype);

  MPI_Comm comm_;
  MpiCommOwnership ownership_;
  size_t max_count_per_call_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<std::byte> scratch_;  // [size, chunk] contributions gathered for an ordered sum
};

}  // namespace moeforge
