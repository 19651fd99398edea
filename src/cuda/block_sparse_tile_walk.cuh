// What the tensor-core and the Hopper block-sparse attention kernels share: the walk over the key
// tiles of one block of query rows through its CSR row (kKeys keys at a time within each selected
// key block, in ascending order, skipping tiles that start after the block's last query row,
// which causality masks whole), and their launch over blocks of query rows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/block_sparse_attention_kernels.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {

// Where the next key tile comes from: CSR entry e of the row, its first key t0, and key_end, one
// past the last key of entry e's block.
struct TileCursor {
  int64_t e, t0, key_end;
};

template <int kKeys>
struct TileWalk {
  const int32_t* col_idx;
  int64_t block_size, seq_len;
  int64_t begin, end;  // the CSR row's entries
  int64_t last_pos;    // the last query row of the block of rows

  // Query rows [row0, row0 + rows) of query head `head`.
  __device__ TileWalk(const BlockSparseLaunch& a, int head, int64_t row0, int64_t rows)
      : col_idx(a.col_idx), block_size(a.block_size), seq_len(a.seq_len) {
    last_pos = min(row0 + rows, a.seq_len) - 1;
    const int64_t csr_row = head * a.num_blocks + row0 / a.block_size;
    begin = a.row_offsets[csr_row];
    end = a.row_offsets[csr_row + 1];
  }
  // The first tile of entry e (one read of col_idx; entries from `end` on give t0 = key_end = 0).
  __device__ TileCursor first(int64_t e) const {
    if (e >= end) return TileCursor{e, 0, 0};
    const int64_t t0 = static_cast<int64_t>(col_idx[e]) * block_size;
    return TileCursor{e, t0, min(t0 + block_size, seq_len)};
  }
  __device__ TileCursor next(TileCursor c) const {
    c.t0 += kKeys;
    if (c.t0 >= c.key_end || c.t0 > last_pos) c = first(c.e + 1);
    return c;
  }
};

// One block of `threads` threads per (`rows` query rows, query head), with smem_bytes of dynamic
// shared memory.
template <class Kernel>
void launch_over_query_blocks(Kernel kernel, int64_t rows, int threads, int smem_bytes,
                              const BlockSparseLaunch& args, cudaStream_t stream) {
  MF_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const dim3 grid(static_cast<unsigned>(ceil_div(args.seq_len, rows)),
                  static_cast<unsigned>(args.num_q_heads));
  kernel<<<grid, threads, smem_bytes, stream>>>(args);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
