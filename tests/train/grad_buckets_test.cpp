// GradBuckets: the spans an overlapped data-parallel reduction sums, and when. Exact: every
// element of the buffer is summed exactly once, in spans that never include a range before it is
// reported, each handed out as soon as its bucket holds bucket_elems elements.
#include "train/grad_buckets.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"

namespace moeforge {
namespace {

// Ranges of the given sizes, the first at the top of the buffer (the backward's order).
std::vector<GradRange> descending(const std::vector<int64_t>& sizes) {
  int64_t total = 0;
  for (const int64_t s : sizes) total += s;
  std::vector<GradRange> ranges;
  for (const int64_t s : sizes) {
    total -= s;
    ranges.push_back({total, s});
  }
  return ranges;
}

TEST(GradBuckets, FillsBucketsFromTheTopAndHandsThemOutWhenFull) {
  // Sizes 3, 5, 2, 7, 4 from the top of a 21-element buffer: [18, 21), [13, 18), [11, 13),
  // [4, 11), [0, 4).
  GradBuckets buckets(descending({3, 5, 2, 7, 4}), 8);
  EXPECT_EQ(buckets.ready(0), (GradRange{}));       // 3 pending
  EXPECT_EQ(buckets.ready(1), (GradRange{13, 8}));  // 8: full
  EXPECT_EQ(buckets.ready(2), (GradRange{}));       // 2 pending
  EXPECT_EQ(buckets.ready(3), (GradRange{4, 9}));   // 9: full
  EXPECT_EQ(buckets.ready(4), (GradRange{}));       // 4 pending
  EXPECT_EQ(buckets.rest(), (GradRange{0, 4}));
  EXPECT_EQ(buckets.rest(), (GradRange{0, 0}));
  EXPECT_EQ(buckets.max_piece(), 8u);
  EXPECT_EQ(buckets.pieces({4, 9}), (std::vector<GradRange>{{4, 8}, {12, 1}}));
  EXPECT_EQ(buckets.pieces({0, 0}), (std::vector<GradRange>{}));
}

TEST(GradBuckets, RestCoversTheRangesNeverReported) {
  GradBuckets buckets(descending({3, 5, 2, 7, 4}), 4);
  EXPECT_EQ(buckets.ready(0), (GradRange{}));
  EXPECT_EQ(buckets.ready(1), (GradRange{13, 8}));
  EXPECT_EQ(buckets.rest(), (GradRange{0, 13}));
  EXPECT_EQ(buckets.pieces({0, 13}), (std::vector<GradRange>{{0, 4}, {4, 4}, {8, 4}, {12, 1}}));
  EXPECT_THROW(buckets.ready(2), Error);  // nothing after rest()
}

TEST(GradBuckets, BucketZeroSumsEverythingAtTheEndInOnePiece) {
  GradBuckets buckets(descending({3, 5, 2}), 0);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(buckets.ready(i), (GradRange{})) << i;
  EXPECT_EQ(buckets.rest(), (GradRange{0, 10}));
  EXPECT_EQ(buckets.max_piece(), 10u);
  EXPECT_EQ(buckets.pieces({0, 10}), (std::vector<GradRange>{{0, 10}}));
  // A bucket larger than the buffer: pieces of the whole buffer at most.
  EXPECT_EQ(GradBuckets(descending({3, 5, 2}), 1000).max_piece(), 10u);
}

// Every element summed exactly once, never before its range is reported, for many bucket sizes.
TEST(GradBuckets, EverySpanIsReportedAndEachElementSummedOnce) {
  const std::vector<int64_t> sizes = {1, 9, 4, 4, 13, 2, 1, 30, 6};
  int64_t total = 0;
  for (const int64_t s : sizes) total += s;
  for (size_t bucket = 0; bucket <= 80; ++bucket) {
    const std::vector<GradRange> ranges = descending(sizes);
    GradBuckets buckets(ranges, bucket);
    std::vector<int> summed(static_cast<size_t>(total), 0);
    const auto take = [&](GradRange span, int64_t lowest_reported) {
      EXPECT_GE(span.offset, span.count > 0 ? lowest_reported : 0) << "bucket " << bucket;
      for (const GradRange& piece : buckets.pieces(span)) {
        EXPECT_LE(piece.count, static_cast<int64_t>(buckets.max_piece()));
        for (int64_t i = piece.offset; i < piece.offset + piece.count; ++i) ++summed[i];
      }
    };
    for (size_t i = 0; i < ranges.size(); ++i) take(buckets.ready(i), ranges[i].offset);
    take(buckets.rest(), 0);
    for (int64_t i = 0; i < total; ++i) ASSERT_EQ(summed[i], 1) << "bucket " << bucket << " @" << i;
  }
}

TEST(GradBuckets, RejectsRangesThatDoNotTileAndReportsOutOfOrder) {
  const auto message = [](std::vector<GradRange> ranges) {
    try {
      GradBuckets buckets(std::move(ranges), 4);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message({{5, 5}, {2, 2}, {0, 2}}).find("does not end at 5"), std::string::npos);
  EXPECT_NE(message({{0, 5}, {5, 5}}).find("tile the buffer in descending offsets"),
            std::string::npos);
  EXPECT_NE(message({{5, 5}, {1, 4}}).find("must reach offset 0, they stop at 1"),
            std::string::npos);
  EXPECT_NE(message({{5, 0}, {0, 5}}).find("non-empty"), std::string::npos);
  EXPECT_NE(message({}).find("no gradient ranges"), std::string::npos);

  GradBuckets buckets(descending({3, 5}), 4);
  EXPECT_THROW(buckets.ready(1), Error);
  EXPECT_EQ(buckets.ready(0), (GradRange{}));
  EXPECT_THROW(buckets.ready(0), Error);
  EXPECT_THROW(buckets.ready(2), Error);
}

}  // namespace
}  // namespace moeforge
