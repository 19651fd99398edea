// Scatter tokens into expert-sorted rows and gather them back, driven by a RowMap.
#pragma once

#include <cstdint>

#include "ops/row_map.h"

namespace moeforge::ops {

// rows[r, :] = x[row_token[r], :]          x [num_tokens, c], rows [num_rows, c]
template <typename T>
void scatter_rows_forward(T* rows, const T* x, const RowMap& map, int64_t c);

// dx [num_tokens, c] (assign) = sum of drows over the rows of each token (slot order).
template <typename T>
void scatter_rows_backward(T* dx, const T* drows, const RowMap& map, int64_t c);

// out[t, :] = sum over slots j with assignment_row[t*k+j] = r >= 0 of gates[t, j] * rows[r, :]
// (assign; tokens with no local row get 0). gates [num_tokens, top_k].
template <typename T>
void gather_rows_forward(T* out, const T* rows, const T* gates, const RowMap& map, int64_t c);

// drows [num_rows, c] (assign) = gates * dout[token]; dgates [num_tokens, top_k] (assign) =
// dot(dout[token], rows[r]) for mapped assignments, 0 otherwise.
template <typename T>
void gather_rows_backward(T* drows, T* dgates, const T* dout, const T* rows, const T* gates,
                          const RowMap& map, int64_t c);

}  // namespace moeforge::ops
