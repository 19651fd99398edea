// A Communicator decorator that counts what this rank sends to the other ranks, per collective and
// dtype: `moeforge bench comm` and the tests that check communication volumes against their
// formulas.
#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "comm/forwarding_communicator.h"

namespace moeforge {

// Counts, for a group of n ranks: an all-gather or reduce-scatter of c elements per rank and an
// all-to-all of chunks of c: (n - 1) c (what a ring sends); an all-reduce of c: (n - 1) c (a copy
// to each other rank); an all-to-all-v: the elements for the other ranks; a broadcast of c: (n - 1)
// c from the root; a reduce of c to a root: c from every other rank.
class CountingCommunicator final : public ForwardingCommunicator {
 public:
  enum class Collective { kAllReduce, kAllGather, kReduceScatter, kAllToAll, kBroadcast, kReduce };

  using ForwardingCommunicator::ForwardingCommunicator;
  std::string name() const override { return "counting"; }
  void all_reduce_sum(void* data, size_t count, CommDType dtype) override {
    add(Collective::kAllReduce, dtype, count * others());
    inner_.all_reduce_sum(data, count, dtype);
  }
  void all_gather(const void* send, void* recv, size_t count, CommDType dtype) override {
    add(Collective::kAllGather, dtype, count * others());
    inner_.all_gather(send, recv, count, dtype);
  }
  void reduce_scatter_sum(const void* send, void* recv, size_t count, CommDType dtype) override {
    add(Collective::kReduceScatter, dtype, count * others());
    inner_.reduce_scatter_sum(send, recv, count, dtype);
  }
  void all_to_all(const void* send, void* recv, size_t count, CommDType dtype) override {
    add(Collective::kAllToAll, dtype, count * others());
    inner_.all_to_all(send, recv, count, dtype);
  }
  void all_to_all_v(const void* send, const size_t* send_counts, const size_t* send_offsets,
                    void* recv, const size_t* recv_counts, const size_t* recv_offsets,
                    CommDType dtype) override {
    for (int j = 0; j < size(); ++j) {
      if (j != rank()) add(Collective::kAllToAll, dtype, send_counts[j]);
    }
    inner_.all_to_all_v(send, send_counts, send_offsets, recv, recv_counts, recv_offsets, dtype);
  }

  void broadcast(void* data, size_t count, CommDType dtype, int root) override {
    if (rank() == root) add(Collective::kBroadcast, dtype, count * others());
    inner_.broadcast(data, count, dtype, root);
  }
  void reduce_sum(void* data, size_t count, CommDType dtype, int root) override {
    if (rank() != root) add(Collective::kReduce, dtype, count);
    inner_.reduce_sum(data, count, dtype, root);
  }

  // Elements sent by collective c in dtype (in every dtype when it is not given).
  size_t elements(Collective c, std::optional<CommDType> dtype = std::nullopt) const {
    size_t total = 0;
    for (const auto& [key, count] : elements_) {
      if (key.first == c && (!dtype || key.second == *dtype)) total += count;
    }
    return total;
  }
  // Bytes sent by all collectives.
  size_t bytes() const {
    size_t total = 0;
    for (const auto& [key, count] : elements_) total += count * comm_dtype_size(key.second);
    return total;
  }

 private:
  size_t others() const { return static_cast<size_t>(size() - 1); }
  void add(Collective c, CommDType dtype, size_t count) { elements_[{c, dtype}] += count; }

  std::map<std::pair<Collective, CommDType>, size_t> elements_;
};

}  // namespace moeforge
