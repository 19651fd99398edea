// Bucket bookkeeping of the overlapped data-parallel gradient reduction.
#include "train/grad_buckets.h"

#include <algorithm>
#include <utility>

#include "core/error.h"

namespace moeforge {

GradBuckets::GradBuckets(std::vector<GradRange> ranges, size_t bucket_elems)
    : ranges_(std::move(ranges)), bucket_elems_(bucket_elems) {
  MF_CHECK(!ranges_.empty(), "no gradient ranges to reduce");
  int64_t below = ranges_.front().offset + ranges_.front().count;
  total_ = below;
  for (const GradRange& r : ranges_) {
    MF_CHECK(r.count > 0 && r.offset >= 0 && r.offset + r.count == below,
             "gradient ranges must be non-empty and tile the buffer in descending offsets; range "
             "[{}, {}) does not end at {}",
             r.offset, r.offset + r.count, below);
    below = r.offset;
  }
  MF_CHECK(below == 0, "gradient ranges must reach offset 0, they stop at {}", below);
  pending_begin_ = pending_end_ = total_;
}

GradRange GradBuckets::ready(size_t index) {
  MF_CHECK(index == next_ && index < ranges_.size(),
           "gradient range {} reported out of order (expected {} of {})", index, next_,
           ranges_.size());
  ++next_;
  pending_begin_ = ranges_[index].offset;
  if (bucket_elems_ == 0 || static_cast<size_t>(pending_end_ - pending_begin_) < bucket_elems_) {
    return {};
  }
  const GradRange span{pending_begin_, pending_end_ - pending_begin_};
  pending_end_ = pending_begin_;
  return span;
}

GradRange GradBuckets::rest() {
  const GradRange span{0, pending_end_};
  pending_begin_ = pending_end_ = 0;
  next_ = ranges_.size();
  return span;
}

size_t GradBuckets::max_piece() const {
  const auto total = static_cast<size_t>(total_);
  return bucket_elems_ > 0 ? std::min(bucket_elems_, total) : total;
}

std::vector<GradRange> GradBuckets::pieces(GradRange span) const {
  std::vector<GradRange> out;
  const auto piece = static_cast<int64_t>(max_piece());
  for (int64_t begin = span.offset; begin < span.offset + span.count; begin += piece) {
    out.push_back({begin, std::min(piece, span.offset + span.count - begin)});
  }
  return out;
}

}  // namespace moeforge
