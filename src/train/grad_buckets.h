// Which parts of a flat gradient buffer a data-parallel reduction overlapped with the backward
// sums when (the bookkeeping only, no device): the backward finishes the buffer's ranges in a
// known order, consecutive ranges fill a bucket until it holds at least bucket_elems elements,
// and a full bucket is summed in pieces of at most bucket_elems elements.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/param_range.h"

namespace moeforge {

// [offset, offset + count) of a flat gradient buffer, in elements.
using GradRange = ParamRange;

class GradBuckets {
 public:
  // `ranges`: the order in which the backward finishes them, descending offsets that tile [0,
  // total) without gaps (throws moeforge::Error otherwise). bucket_elems 0: one bucket, summed
  // by rest().
  GradBuckets(std::vector<GradRange> ranges, size_t bucket_elems);

  // Range `index` (the next one; throws when out of order) is final: the span to sum now, or an
  // empty one while the bucket is not full.
  GradRange ready(size_t index);
  // Everything not yet handed out (ranges never reported included): [0, end of the pending
  // bucket); empty when none. Nothing is handed out after it.
  GradRange rest();
  // The pieces a span is summed in, in ascending offsets: at most max_piece() elements each.
  std::vector<GradRange> pieces(GradRange span) const;
  size_t max_piece() const;

 private:
  std::vector<GradRange> ranges_;
  size_t bucket_elems_;
  int64_t total_ = 0;
  size_t next_ = 0;
  int64_t pending_begin_ = 0, pending_end_ = 0;  // the bucket being filled
};

}  // namespace moeforge
