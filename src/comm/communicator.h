// The one interface for all communication between ranks (MPI on CPU, NCCL on GPU).
// Single-rank runs use SelfCommunicator, so every layer is written for n ranks and n = 1 is a
// special case of the same code. Buffers are host pointers for the CPU implementations (Self,
// MPI) and device pointers for NcclCommunicator (comm/nccl/nccl_communicator.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace moeforge {

// kBFloat16: 2-byte bfloat16 (the raw bits; no C++ type in this header). Sums of it are done in
// fp32 and rounded to nearest even by each implementation (see its header for where it rounds).
enum class CommDType { kFloat32, kFloat64, kInt32, kInt64, kUInt8, kBFloat16 };

// Bytes of one element: 4, 8, 4, 8, 1, 2.
size_t comm_dtype_size(CommDType dtype);

template <typename T>
constexpr CommDType comm_dtype_of();
template <>
constexpr CommDType comm_dtype_of<float>() {
  return CommDType::kFloat32;
}
template <>
constexpr CommDType comm_dtype_of<double>() {
  return CommDType::kFloat64;
}
template <>
constexpr CommDType comm_dtype_of<int32_t>() {
  return CommDType::kInt32;
}
template <>
constexpr CommDType comm_dtype_of<int64_t>() {
  return CommDType::kInt64;
}
template <>
constexpr CommDType comm_dtype_of<uint8_t>() {
  return CommDType::kUInt8;
}

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;

  // In place: data[i] = sum over ranks of data[i].
  virtual void all_reduce_sum(void* data, size_t count, CommDType dtype) = 0;
  // recv = concat over ranks (rank order) of send; send has count_per_rank elements.
  virtual void all_gather(const void* send, void* recv, size_t count_per_rank, CommDType dtype) = 0;
  // send has size() * count_per_rank elements; rank r receives the sum of chunk r over ranks.
  virtual void reduce_scatter_sum(const void* send, void* recv, size_t count_per_rank,
                                  CommDType dtype) = 0;
  // Chunk j of send (count_per_rank elements) goes to rank j; chunk i of recv came from rank i.
  virtual void all_to_all(const void* send, void* recv, size_t count_per_rank, CommDType dtype) = 0;
  // Variable sizes: send_counts[j] elements at send_offsets[j] go to rank j, and so on.
  virtual void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                            void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                            CommDType dtype) = 0;
  virtual void broadcast(void* data, size_t count, CommDType dtype, int root) = 0;
  // In place on root: data[i] = sum over ranks of data[i]; the other ranks' data stays as it was.
  virtual void reduce_sum(void* data, size_t count, CommDType dtype, int root) = 0;
  virtual void barrier() = 0;
  // Ranks with the same color form a sub-group, ordered by key (MPI_Comm_split semantics).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  template <typename T>
  void all_reduce_sum(T* data, size_t count) {
    all_reduce_sum(static_cast<void*>(data), count, comm_dtype_of<T>());
  }
  template <typename T>
  void all_gather(const T* send, T* recv, size_t count_per_rank) {
    all_gather(static_cast<const void*>(send), static_cast<void*>(recv), count_per_rank,
               comm_dtype_of<T>());
  }
  template <typename T>
  void reduce_scatter_sum(const T* send, T* recv, size_t count_per_rank) {
    reduce_scatter_sum(static_cast<const void*>(send), static_cast<void*>(recv), count_per_rank,
                       comm_dtype_of<T>());
  }
  template <typename T>
  void all_to_all(const T* send, T* recv, size_t count_per_rank) {
    all_to_all(static_cast<const void*>(send), static_cast<void*>(recv), count_per_rank,
               comm_dtype_of<T>());
  }
  template <typename T>
  void broadcast(T* data, size_t count, int root) {
    broadcast(static_cast<void*>(data), count, comm_dtype_of<T>(), root);
  }
  template <typename T>
  void reduce_sum(T* data, size_t count, int root) {
    reduce_sum(static_cast<void*>(data), count, comm_dtype_of<T>(), root);
  }
};

// n = 1: every collective is a copy (or nothing).
class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "self"; }
  void all_reduce_sum(void*, size_t, CommDType) override {}
  void all_gather(const void* send, void* recv, size_t count_per_rank, CommDType dtype) override;
  void reduce_scatter_sum(const void* send, void* recv, size_t count_per_rank,
                          CommDType dtype) override;
  void all_to_all(const void* send, void* recv, size_t count_per_rank, CommDType dtype) override;
  void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                    void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                    CommDType dtype) override;
  void broadcast(void*, size_t, CommDType, int) override {}
  void reduce_sum(void* data, size_t count, CommDType dtype, int root) override;
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override;
  using Communicator::all_gather;
  using Communicator::all_reduce_sum;
  using Communicator::all_to_all;
  using Communicator::broadcast;
  using Communicator::reduce_scatter_sum;
  using Communicator::reduce_sum;
};

// The world communicator of this process: MPI's world when built with MPI and launched by mpirun
// (initialising MPI once), otherwise a SelfCommunicator.
Communicator& world_communicator();

// An NcclCommunicator (device buffers, GPU collectives) over the ranks of `parent`, a communicator
// of host buffers such as world_communicator(); collective over parent. Each rank uses its current
// CUDA device (bind it first, e.g. to local rank % device count). Throws moeforge::Error when this
// build has no NCCL (MOEFORGE_NCCL=OFF).
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& parent);

// Ends every rank of the job with exit_code (MPI_Abort when the world is MPI's with more than one
// rank, so that no rank is left waiting in a collective for one that failed); otherwise exits.
[[noreturn]] void abort_world(int exit_code);

}  // namespace moeforge
