// MpiCommunicator: the Communicator collectives through MPI, with rank-ordered floating-point sums.
#include "comm/mpi/mpi_communicator.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>

namespace moeforge {

void check_mpi(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return;
  char message[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, message, &length);
  throw_error(file, line,
              fmt::format("{} failed with MPI error {}: {}", call, code,
                          length > 0 ? std::string_view(message, length) : "(no message)"));
}

namespace {

MPI_Datatype mpi_datatype(CommDType dtype) {
  switch (dtype) {
    case CommDType::kFloat32: return MPI_FLOAT;
    case CommDType::kFloat64: return MPI_DOUBLE;
    case CommDType::kInt32: return MPI_INT32_T;
    case CommDType::kInt64: return MPI_INT64_T;
    case CommDType::kUInt8: return MPI_UINT8_T;
    case CommDType::kBFloat16: return MPI_UINT16_T;  // moved as raw bits, summed by us
  }
  MF_FAIL("unknown CommDType {}", static_cast<int>(dtype));
}

bool is_floating(CommDType dtype) {
  return dtype == CommDType::kFloat32 || dtype == CommDType::kFloat64 ||
         dtype == CommDType::kBFloat16;
}

float bf16_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// Round to nearest, ties to even; a NaN stays a (quiet) NaN, overflow becomes infinity.
uint16_t float_to_bf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// MPI 3.1 takes counts and displacements as int; larger values must be refused, not truncated.
int to_mpi_count(size_t value, const char* op, const char* what) {
  MF_CHECK(value <= MpiCommunicator::kMaxMpiCount,
           "MpiCommunicator::{}: {} = {} does not fit in MPI's int count (max {}); split the "
           "exchange into smaller calls",
           op, what, value, MpiCommunicator::kMaxMpiCount);
  return static_cast<int>(value);
}

// Per-peer counts or offsets of all_to_all_v as MPI ints, naming the first one that overflows.
std::vector<int> to_mpi_counts(const size_t* values, int num_ranks, const char* what) {
  std::vector<int> result(num_ranks);
  for (int peer_idx = 0; peer_idx < num_ranks; ++peer_idx) {
    MF_CHECK(values[peer_idx] <= MpiCommunicator::kMaxMpiCount,
             "MpiCommunicator::all_to_all_v: {}[{}] = {} does not fit in MPI's int count (max {}); "
             "split the exchange into smaller calls",
             what, peer_idx, values[peer_idx], MpiCommunicator::kMaxMpiCount);
    result[peer_idx] = static_cast<int>(values[peer_idx]);
  }
  return result;
}

void check_disjoint(const char* op, const void* send, size_t send_bytes, const void* recv,
                    size_t recv_bytes) {
  if (send_bytes == 0 || recv_bytes == 0) return;
  const auto* send_begin = static_cast<const std::byte*>(send);
  const auto* recv_begin = static_cast<const std::byte*>(recv);
  const bool overlap = send_begin < recv_begin + recv_bytes && recv_begin < send_begin + send_bytes;
  MF_CHECK(!overlap, "MpiCommunicator::{}: send and recv buffers overlap; use distinct buffers",
           op);
}

// out[i] = ((x_0[i] + x_1[i]) + x_2[i]) + ... for contributions [num_ranks, count].
template <typename T>
void sum_in_rank_order(const T* contributions, T* out, int num_ranks, size_t count) {
  std::copy(contributions, contributions + count, out);
  for (int rank_idx = 1; rank_idx < num_ranks; ++rank_idx) {
    const T* row = contributions + static_cast<size_t>(rank_idx) * count;
    for (size_t i = 0; i < count; ++i) out[i] += row[i];
  }
}

// bf16 contributions [num_ranks, count]: each element summed in fp32 in rank order and rounded to
// bf16 once, so no intermediate sum is rounded to 8 bits.
void sum_bf16_in_rank_order(const uint16_t* contributions, uint16_t* out, int num_ranks,
                            size_t count) {
  for (size_t i = 0; i < count; ++i) {
    float sum = bf16_to_float(contributions[i]);
    for (int rank_idx = 1; rank_idx < num_ranks; ++rank_idx) {
      sum += bf16_to_float(contributions[static_cast<size_t>(rank_idx) * count + i]);
    }
    out[i] = float_to_bf16(sum);
  }
}

void sum_in_rank_order(const void* contributions, void* out, int num_ranks, size_t count,
                       CommDType dtype) {
  if (dtype == CommDType::kBFloat16) {
    sum_bf16_in_rank_order(static_cast<const uint16_t*>(contributions), static_cast<uint16_t*>(out),
                           num_ranks, count);
  } else if (dtype == CommDType::kFloat32) {
    sum_in_rank_order(static_cast<const float*>(contributions), static_cast<float*>(out), num_ranks,
                      count);
  } else {
    sum_in_rank_order(static_cast<const double*>(contributions), static_cast<double*>(out),
                      num_ranks, count);
  }
}

// Balanced split of count elements over num_ranks chunks; the first count % num_ranks get one more.
size_t chunk_begin(size_t count, int num_ranks, int rank_idx) {
  const size_t idx = static_cast<size_t>(rank_idx);
  return idx * (count / num_ranks) + std::min(idx, count % num_ranks);
}

size_t chunk_length(size_t count, int num_ranks, int rank_idx) {
  return count / num_ranks + (static_cast<size_t>(rank_idx) < count % num_ranks ? 1 : 0);
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, MpiCommOwnership ownership,
                                 size_t max_count_per_call)
    : comm_(comm), ownership_(ownership), max_count_per_call_(max_count_per_call) {
  MF_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator needs a valid MPI_Comm, got MPI_COMM_NULL");
  MF_CHECK(max_count_per_call >= 1 && max_count_per_call <= kMaxMpiCount,
           "MpiCommunicator: max_count_per_call = {} must be in [1, {}]", max_count_per_call,
           kMaxMpiCount);
  MF_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MF_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MF_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  if (ownership_ != MpiCommOwnership::kOwned) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

void MpiCommunicator::all_reduce_sum(void* data, size_t count, CommDType dtype) {
  const size_t elem_bytes = comm_dtype_size(dtype);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  for (size_t begin = 0; begin < count; begin += max_count_per_call_) {
    const size_t segment_count = std::min(max_count_per_call_, count - begin);
    std::byte* segment = static_cast<std::byte*>(data) + begin * elem_bytes;
    if (is_floating(dtype)) {
      all_reduce_sum_ordered(segment, segment_count, dtype);
    } else {
      MF_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, segment, static_cast<int>(segment_count), mpi_type,
                                 MPI_SUM, comm_));
    }
  }
}

void MpiCommunicator::all_reduce_sum_ordered(void* data, size_t count, CommDType dtype) {
  const size_t elem_bytes = comm_dtype_size(dtype);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  // Chunk r of data is reduced by rank r; every count and offset is <= count <= INT_MAX.
  std::vector<int> chunk_counts(size_);
  std::vector<int> chunk_offsets(size_);
  for (int rank_idx = 0; rank_idx < size_; ++rank_idx) {
    chunk_counts[rank_idx] = static_cast<int>(chunk_length(count, size_, rank_idx));
    chunk_offsets[rank_idx] = static_cast<int>(chunk_begin(count, size_, rank_idx));
  }
  const int own_count = chunk_counts[rank_];
  std::vector<int> recv_counts(size_, own_count);
  std::vector<int> recv_offsets(size_);
  for (int rank_idx = 0; rank_idx < size_; ++rank_idx) {
    recv_offsets[rank_idx] = rank_idx * own_count;
  }
  scratch_.resize(static_cast<size_t>(size_) * own_count * elem_bytes);  // [size, own_count]

  MF_MPI_CHECK(MPI_Alltoallv(data, chunk_counts.data(), chunk_offsets.data(), mpi_type,
                             scratch_.data(), recv_counts.data(), recv_offsets.data(), mpi_type,
                             comm_));
  std::byte* own_chunk = static_cast<std::byte*>(data) + chunk_offsets[rank_] * elem_bytes;
  sum_in_rank_order(scratch_.data(), own_chunk, size_, own_count, dtype);
  MF_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, chunk_counts.data(),
                              chunk_offsets.data(), mpi_type, comm_));
}

void MpiCommunicator::all_gather(const void* send, void* recv, size_t count_per_rank,
                                 CommDType dtype) {
  const int mpi_count = to_mpi_count(count_per_rank, "all_gather", "count_per_rank");
  const size_t send_bytes = count_per_rank * comm_dtype_size(dtype);
  check_disjoint("all_gather", send, send_bytes, recv, send_bytes * size_);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  MF_MPI_CHECK(MPI_Allgather(send, mpi_count, mpi_type, recv, mpi_count, mpi_type, comm_));
}

void MpiCommunicator::reduce_scatter_sum(const void* send, void* recv, size_t count_per_rank,
                                         CommDType dtype) {
  const int mpi_count = to_mpi_count(count_per_rank, "reduce_scatter_sum", "count_per_rank");
  const size_t recv_bytes = count_per_rank * comm_dtype_size(dtype);
  check_disjoint("reduce_scatter_sum", send, recv_bytes * size_, recv, recv_bytes);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  if (!is_floating(dtype)) {
    MF_MPI_CHECK(MPI_Reduce_scatter_block(send, recv, mpi_count, mpi_type, MPI_SUM, comm_));
    return;
  }
  scratch_.resize(recv_bytes * size_);  // [size, count_per_rank]: chunk rank_ of every rank
  MF_MPI_CHECK(
      MPI_Alltoall(send, mpi_count, mpi_type, scratch_.data(), mpi_count, mpi_type, comm_));
  sum_in_rank_order(scratch_.data(), recv, size_, count_per_rank, dtype);
}

void MpiCommunicator::all_to_all(const void* send, void* recv, size_t count_per_rank,
                                 CommDType dtype) {
  const int mpi_count = to_mpi_count(count_per_rank, "all_to_all", "count_per_rank");
  const size_t total_bytes = count_per_rank * comm_dtype_size(dtype) * size_;
  check_disjoint("all_to_all", send, total_bytes, recv, total_bytes);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  MF_MPI_CHECK(MPI_Alltoall(send, mpi_count, mpi_type, recv, mpi_count, mpi_type, comm_));
}

void MpiCommunicator::all_to_all_v(const void* send, const size_t* send_counts,
                                   const size_t* send_offsets, void* recv,
                                   const size_t* recv_counts, const size_t* recv_offsets,
                                   CommDType dtype) {
  const std::vector<int> mpi_send_counts = to_mpi_counts(send_counts, size_, "send_counts");
  const std::vector<int> mpi_send_offsets = to_mpi_counts(send_offsets, size_, "send_offsets");
  const std::vector<int> mpi_recv_counts = to_mpi_counts(recv_counts, size_, "recv_counts");
  const std::vector<int> mpi_recv_offsets = to_mpi_counts(recv_offsets, size_, "recv_offsets");
  size_t send_extent = 0;
  size_t recv_extent = 0;
  for (int peer_idx = 0; peer_idx < size_; ++peer_idx) {
    if (send_counts[peer_idx] > 0) {
      send_extent = std::max(send_extent, send_offsets[peer_idx] + send_counts[peer_idx]);
    }
    if (recv_counts[peer_idx] > 0) {
      recv_extent = std::max(recv_extent, recv_offsets[peer_idx] + recv_counts[peer_idx]);
    }
  }
  const size_t elem_bytes = comm_dtype_size(dtype);
  check_disjoint("all_to_all_v", send, send_extent * elem_bytes, recv, recv_extent * elem_bytes);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  MF_MPI_CHECK(MPI_Alltoallv(send, mpi_send_counts.data(), mpi_send_offsets.data(), mpi_type, recv,
                             mpi_recv_counts.data(), mpi_recv_offsets.data(), mpi_type, comm_));
}

void MpiCommunicator::broadcast(void* data, size_t count, CommDType dtype, int root) {
  MF_CHECK(root >= 0 && root < size_,
           "MpiCommunicator::broadcast: root {} is not a rank of this communicator of size {}",
           root, size_);
  const size_t elem_bytes = comm_dtype_size(dtype);
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  for (size_t begin = 0; begin < count; begin += max_count_per_call_) {
    const size_t segment_count = std::min(max_count_per_call_, count - begin);
    std::byte* segment = static_cast<std::byte*>(data) + begin * elem_bytes;
    MF_MPI_CHECK(MPI_Bcast(segment, static_cast<int>(segment_count), mpi_type, root, comm_));
  }
}

void MpiCommunicator::reduce_sum(void* data, size_t count, CommDType dtype, int root) {
  MF_CHECK(root >= 0 && root < size_,
           "MpiCommunicator::reduce_sum: root {} is not a rank of this communicator of size {}",
           root, size_);
  const int mpi_count = to_mpi_count(count, "reduce_sum", "count");
  const MPI_Datatype mpi_type = mpi_datatype(dtype);
  const bool is_root = rank_ == root;
  if (!is_floating(dtype)) {
    MF_MPI_CHECK(
        MPI_Reduce(is_root ? MPI_IN_PLACE : data, data, mpi_count, mpi_type, MPI_SUM, root, comm_));
    return;
  }
  const size_t bytes = count * comm_dtype_size(dtype);
  if (is_root) scratch_.resize(bytes * size_);  // [size, count]: every rank's data
  MF_MPI_CHECK(MPI_Gather(data, mpi_count, mpi_type, is_root ? scratch_.data() : nullptr, mpi_count,
                          mpi_type, root, comm_));
  if (is_root) sum_in_rank_order(scratch_.data(), data, size_, count, dtype);
}

void MpiCommunicator::barrier() {
  MF_MPI_CHECK(MPI_Barrier(comm_));
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  MF_CHECK(color >= 0, "MpiCommunicator::split: color must be >= 0, got {}", color);
  MPI_Comm sub_comm = MPI_COMM_NULL;
  MF_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub_comm));
  return std::make_unique<MpiCommunicator>(sub_comm, MpiCommOwnership::kOwned, max_count_per_call_);
}

}  // namespace moeforge
