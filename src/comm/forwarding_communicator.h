// A Communicator that forwards every call to another one: the base of decorators, which override
// only the collectives they observe (CountingCommunicator) or change (the tests' float sums).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace moeforge {

class ForwardingCommunicator : public Communicator {
 public:
  explicit ForwardingCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return inner_.name(); }
  void all_reduce_sum(void* data, size_t count, CommDType dtype) override {
    inner_.all_reduce_sum(data, count, dtype);
  }
  void all_gather(const void* send, void* recv, size_t count, CommDType dtype) override {
    inner_.all_gather(send, recv, count, dtype);
  }
  void reduce_scatter_sum(const void* send, void* recv, size_t count, CommDType dtype) override {
    inner_.reduce_scatter_sum(send, recv, count, dtype);
  }
  void all_to_all(const void* send, void* recv, size_t count, CommDType dtype) override {
    inner_.all_to_all(send, recv, count, dtype);
  }
  void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                    void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                    CommDType dtype) override {
    inner_.all_to_all_v(send, send_counts, send_offsets, recv, recv_counts, recv_offsets, dtype);
  }
  void broadcast(void* data, size_t count, CommDType dtype, int root) override {
    inner_.broadcast(data, count, dtype, root);
  }
  void reduce_sum(void* data, size_t count, CommDType dtype, int root) override {
    inner_.reduce_sum(data, count, dtype, root);
  }
  void barrier() override { inner_.barrier(); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    return inner_.split(color, key);
  }

 protected:
  Communicator& inner_;
};

}  // namespace moeforge
