// Pack and unpack kernels of the Ulysses all-to-all: strided copies of runs of heads / n *
// head_dim values, 16 bytes per access when the runs and pointers allow.
#include "cuda/ulysses_exchange.h"

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

// Which side of the buffer a kernel reads or writes: the local or the heads tensor.
enum class Side { kLocal, kHeads };

// Element i of one tensor's part of the exchange (i < n * batch * seq * run, in buffer order:
// rank, batch, position, run offset) maps to buffer[buffer_index] and to local / heads.
template <int kWidth, Side kSide, bool kToBuffer>
__global__ void ulysses_copy_kernel(bf16* buffer, bf16* tensor, int64_t offset, int64_t chunk,
                                    int64_t batch, int64_t seq, int64_t run, int64_t num_heads_dim,
                                    int64_t num_ranks) {
  const int64_t per_rank = batch * seq * run;
  const int64_t total = num_ranks * per_rank;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kWidth;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x * kWidth) {
    const int64_t r = i / per_rank;
    const int64_t within = i - r * per_rank;  // (b * seq + t) * run + j
    const int64_t bt = within / run, j = within - bt * run;
    const int64_t b = bt / seq, t = bt - b * seq;
    const int64_t buffer_index = r * chunk + offset + within;
    const int64_t tensor_index = kSide == Side::kLocal
                                     ? bt * num_heads_dim + r * run + j
                                     : (b * num_ranks * seq + r * seq + t) * run + j;
    bf16* dst = kToBuffer ? buffer + buffer_index : tensor + tensor_index;
    const bf16* src = kToBuffer ? tensor + tensor_index : buffer + buffer_index;
    if constexpr (kWidth == 1) {
      *dst = *src;
    } else {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    }
  }
}

template <Side kSide, bool kToBuffer>
void copy_all(bf16* buffer, const std::vector<UlyssesTensor>& tensors, const UlyssesShape& shape,
              cudaStream_t stream) {
  const int64_t chunk = ulysses_chunk(tensors, shape);
  int64_t offset = 0;
  for (const UlyssesTensor& tensor : tensors) {
    const int64_t run = tensor.num_heads / shape.num_ranks * shape.head_dim;
    const int64_t total = shape.num_ranks * shape.batch * shape.seq * run;
    bf16* side = kSide == Side::kLocal ? tensor.local : tensor.heads;
    constexpr int kThreads = 256;
    const bool vector =
        run % 8 == 0 && offset % 8 == 0 && chunk % 8 == 0 && aligned_to(16, buffer, side);
    if (total > 0 && vector) {
      ulysses_copy_kernel<8, kSide, kToBuffer>
          <<<grid_for(total / 8, kThreads), kThreads, 0, stream>>>(
              buffer, side, offset, chunk, shape.batch, shape.seq, run,
              tensor.num_heads * shape.head_dim, shape.num_ranks);
    } else if (total > 0) {
      ulysses_copy_kernel<1, kSide, kToBuffer><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
          buffer, side, offset, chunk, shape.batch, shape.seq, run,
          tensor.num_heads * shape.head_dim, shape.num_ranks);
    }
    MF_CUDA_CHECK_LAUNCH();
    offset += shape.batch * shape.seq * run;
  }
}

}  // namespace

int64_t ulysses_chunk(const std::vector<UlyssesTensor>& tensors, const UlyssesShape& shape) {
  MF_CHECK(shape.num_ranks >= 1 && shape.batch >= 0 && shape.seq >= 0 && shape.head_dim >= 1,
           "ulysses exchange: invalid shape (batch {}, seq {}, head_dim {}, {} ranks)", shape.batch,
           shape.seq, shape.head_dim, shape.num_ranks);
  int64_t chunk = 0;
  for (const UlyssesTensor& tensor : tensors) {
    MF_CHECK(tensor.num_heads % shape.num_ranks == 0,
             "ulysses exchange: {} heads do not split over {} ranks", tensor.num_heads,
             shape.num_ranks);
    chunk += shape.batch * shape.seq * (tensor.num_heads / shape.num_ranks) * shape.head_dim;
  }
  return chunk;
}

void ulysses_pack_local(bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                        const UlyssesShape& shape, cudaStream_t stream) {
  copy_all<Side::kLocal, true>(buffer, tensors, shape, stream);
}

void ulysses_unpack_heads(const bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                          const UlyssesShape& shape, cudaStream_t stream) {
  copy_all<Side::kHeads, false>(const_cast<bf16*>(buffer), tensors, shape, stream);
}

void ulysses_pack_heads(bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                        const UlyssesShape& shape, cudaStream_t stream) {
  copy_all<Side::kHeads, true>(buffer, tensors, shape, stream);
}

void ulysses_unpack_local(const bf16* buffer, const std::vector<UlyssesTensor>& tensors,
                          const UlyssesShape& shape, cudaStream_t stream) {
  copy_all<Side::kLocal, false>(const_cast<bf16*>(buffer), tensors, shape, stream);
}

}  // namespace moeforge::cuda
