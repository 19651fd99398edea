// A test-only Communicator whose ranks are threads of this process, and run_ranks() to run a
// function on every rank; shared by the model tests that compare n ranks with one rank.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"

namespace moeforge::testing {

// The ranks of one group are threads of this process; every collective publishes a pointer,
// waits for all ranks, reads the others' buffers, and waits again before anyone reuses them.
// all_gather, all_to_all, all_to_all_v and broadcast copy any dtype; the sums take doubles,
// floats and 64-bit integers.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), barrier_(size), buffers_(size) {}
  int size() const { return size_; }
  void publish(int rank, const void* buffer) {
    buffers_[rank] = buffer;
    barrier_.arrive_and_wait();
  }
  const void* buffer(int rank) const { return buffers_[rank]; }
  void done_reading() { barrier_.arrive_and_wait(); }

 private:
  int size_;
  std::barrier<> barrier_;
  std::vector<const void*> buffers_;
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }
  std::string name() const override { return "threads"; }

  void all_reduce_sum(void* data, size_t count, CommDType dtype) override {
    group_.publish(rank_, data);
    std::vector<char> sum = reduce(0, count, dtype);
    group_.done_reading();
    std::memcpy(data, sum.data(), sum.size());
  }
  void all_gather(const void* send, void* recv, size_t count, CommDType dtype) override {
    group_.publish(rank_, send);
    const size_t bytes = count * comm_dtype_size(dtype);
    for (int r = 0; r < size(); ++r) {
      std::memcpy(static_cast<char*>(recv) + r * bytes, group_.buffer(r), bytes);
    }
    group_.done_reading();
  }
  void reduce_scatter_sum(const void* send, void* recv, size_t count, CommDType dtype) override {
    group_.publish(rank_, send);
    std::vector<char> sum = reduce(rank_ * count, count, dtype);
    group_.done_reading();
    std::memcpy(recv, sum.data(), sum.size());
  }
  void all_to_all(const void* send, void* recv, size_t count, CommDType dtype) override {
    group_.publish(rank_, send);
    const size_t bytes = count * comm_dtype_size(dtype);
    for (int r = 0; r < size(); ++r) {
      std::memcpy(static_cast<char*>(recv) + r * bytes,
                  static_cast<const char*>(group_.buffer(r)) + rank_ * bytes, bytes);
    }
    group_.done_reading();
  }
  void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                    void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                    CommDType dtype) override {
    const VarSend mine{send, send_counts, send_offsets};
    group_.publish(rank_, &mine);
    const size_t elem = comm_dtype_size(dtype);
    std::string mismatch;
    for (int r = 0; r < size(); ++r) {
      const auto* peer = static_cast<const VarSend*>(group_.buffer(r));
      const size_t count = peer->counts[rank_];
      if (count != recv_counts[r]) {
        mismatch = fmt::format("rank {} sends {} elements to rank {}, which expects {}", r, count,
                               rank_, recv_counts[r]);
        break;
      }
      if (count == 0) continue;
      std::memcpy(static_cast<char*>(recv) + recv_offsets[r] * elem,
                  static_cast<const char*>(peer->data) + peer->offsets[rank_] * elem, count * elem);
    }
    group_.done_reading();
    MF_CHECK(mismatch.empty(), "ThreadCommunicator::all_to_all_v: {}", mismatch);
  }
  void broadcast(void* data, size_t count, CommDType dtype, int root) override {
    group_.publish(rank_, data);
    if (rank_ != root) std::memcpy(data, group_.buffer(root), count * comm_dtype_size(dtype));
    group_.done_reading();
  }
  void reduce_sum(void* data, size_t count, CommDType dtype, int root) override {
    group_.publish(rank_, data);
    std::vector<char> sum;
    if (rank_ == root) sum = reduce(0, count, dtype);
    group_.done_reading();
    if (rank_ == root) std::memcpy(data, sum.data(), sum.size());
  }
  void barrier() override {
    group_.publish(rank_, nullptr);
    group_.done_reading();
  }
  std::unique_ptr<Communicator> split(int, int) override { unused("split"); }

 private:
  // What a rank publishes for all_to_all_v: its send buffer and per-destination counts/offsets.
  struct VarSend {
    const void* data;
    const size_t* counts;
    const size_t* offsets;
  };
  [[noreturn]] static void unused(const char* what) {
    MF_FAIL("ThreadCommunicator::{} is not implemented (not used by the model tests)", what);
  }
  // Elements [offset, offset + count) summed over the ranks in rank order (doubles, floats and
  // 64-bit integers).
  std::vector<char> reduce(size_t offset, size_t count, CommDType dtype) const {
    switch (dtype) {
      case CommDType::kFloat64: return reduce_as<double>(offset, count);
      case CommDType::kFloat32: return reduce_as<float>(offset, count);
      case CommDType::kInt64: return reduce_as<int64_t>(offset, count);
      default: MF_FAIL("ThreadCommunicator sums doubles, floats and int64 only");
    }
  }
  template <typename T>
  std::vector<char> reduce_as(size_t offset, size_t count) const {
    std::vector<T> sum(count, T{0});
    for (int r = 0; r < size(); ++r) {
      const T* src = static_cast<const T*>(group_.buffer(r)) + offset;
      for (size_t i = 0; i < count; ++i) sum[i] += src[i];
    }
    std::vector<char> bytes(count * sizeof(T));
    std::memcpy(bytes.data(), sum.data(), bytes.size());
    return bytes;
  }

  ThreadGroup& group_;
  int rank_;
};

// Runs fn(rank communicator) on num_ranks threads and rethrows the first failure.
inline void run_ranks(int num_ranks, const std::function<void(Communicator&)>& fn) {
  ThreadGroup group(num_ranks);
  std::vector<std::exception_ptr> errors(num_ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < num_ranks; ++r) {
    threads.emplace_back([&, r] {
      ThreadCommunicator comm(group, r);
      try {
        fn(comm);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace moeforge::testing
