// The radix-select coverage of cuda/coverage_select.h against its rule computed on the host (a sort
// and a walk): counts and selected flags must be equal, on probability-like values, wide ranges,
// runs of equal values (the cut inside a run), zeros, segments of one value, sizes around the
// kernels' 4096-value chunks, fp32 and fp64 inputs, every gamma, and segments the filter skips
// (left as they were), by both paths (blocks of 4096 values, and a cluster of blocks per segment
// with 1 to 16 blocks).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "cuda/coverage_select.h"
#include "cuda/coverage_select_cluster.h"
#include "cuda/cuda_check.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::expect_equal;
using testing::to_device;

constexpr unsigned long long kUntouchedCount = 0x5eed5eedull;
constexpr uint8_t kUntouchedFlag = 7;

struct HostSelection {
  std::vector<unsigned long long> counts;
  std::vector<uint8_t> selected;
};

// The rule of cuda/coverage_select.h, written directly: fp32 values, 2^-52 fixed point, the order
// by value descending then position, the walk while the prefix sum stays <= the limit.
template <typename T>
HostSelection host_select(const std::vector<T>& values, int64_t num_segments, int64_t size,
                          double gamma, const std::vector<int32_t>& active) {
  HostSelection out{std::vector<unsigned long long>(num_segments, kUntouchedCount),
                    std::vector<uint8_t>(values.size(), kUntouchedFlag)};
  for (int64_t s = 0; s < num_segments; ++s) {
    if (active[s] == 0) continue;
    std::vector<float> v(size);
    std::vector<unsigned long long> fixed(size);
    unsigned long long total = 0;
    for (int64_t i = 0; i < size; ++i) {
      v[i] = static_cast<float>(values[s * size + i]);
      fixed[i] = static_cast<unsigned long long>(std::nearbyint(std::ldexp(double{v[i]}, 52)));
      total += fixed[i];
    }
    const unsigned long long limit =
        gamma >= 1.0
            ? total
            : std::min(total, static_cast<unsigned long long>(gamma * static_cast<double>(total)));
    std::vector<int64_t> order(size);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
    unsigned long long sum = 0, count = 0;
    for (int64_t i = 0; i < size; ++i) out.selected[s * size + i] = 0;
    for (int64_t t : order) {
      sum += fixed[t];
      if (sum > limit) break;
      out.selected[s * size + t] = 1;
      ++count;
    }
    out.counts[s] = count;
  }
  return out;
}

// Runs the device select (both outputs, and the counts alone) with the filter of flags (segment i
// reads flags[i / segments_per_flag]; it runs where the flag is nonzero, or with run_on_zero where
// it is 0) and compares with the host rule.
template <typename T>
void expect_select_matches(const std::string& what, const std::vector<T>& values,
                           int64_t num_segments, int64_t size, double gamma,
                           const std::vector<int32_t>& flag_values, SelectPath path,
                           int64_t segments_per_flag = 1, bool run_on_zero = false) {
  SCOPED_TRACE(what +
               (path == SelectPath::clusters
                    ? " clusters of " + std::to_string(cluster_select_size(size)) + " blocks"
                    : std::string(" many blocks")) +
               " segments=" + std::to_string(num_segments) + " size=" + std::to_string(size) +
               " gamma=" + std::to_string(gamma) + " segments_per_flag=" +
               std::to_string(segments_per_flag) + (run_on_zero ? " on zero" : ""));
  std::vector<int32_t> active(num_segments);
  for (int64_t s = 0; s < num_segments; ++s) {
    const int32_t flag = flag_values[s / segments_per_flag];
    active[s] = run_on_zero ? (flag == 0 ? 1 : 0) : (flag != 0 ? 1 : 0);
  }
  const HostSelection want = host_select(values, num_segments, size, gamma, active);
  DeviceBuffer<T> x = to_device(values);
  DeviceBuffer<int32_t> flags = to_device(flag_values);
  const SegmentFilter filter{flags.data(), segments_per_flag, run_on_zero};
  DeviceBuffer<unsigned long long> counts =
      to_device(std::vector<unsigned long long>(num_segments, kUntouchedCount));
  DeviceBuffer<uint8_t> selected = to_device(std::vector<uint8_t>(values.size(), kUntouchedFlag));
  coverage_select(counts.data(), selected.data(), x.data(), num_segments, size, gamma, filter,
                  nullptr, nullptr, path);
  testing::synchronize();
  expect_equal("counts", counts.download(), want.counts);
  expect_equal("selected", selected.download(), want.selected);

  // The counts alone, twice in a caller's workspace that starts as garbage and is then reused,
  // then the flags alone in it; the guard bytes after it must stay as they were.
  constexpr size_t kGuardBytes = 256;
  const size_t workspace_bytes = coverage_select_workspace_bytes(num_segments, size);
  DeviceBuffer<uint8_t> workspace =
      to_device(std::vector<uint8_t>(workspace_bytes + kGuardBytes, kUntouchedFlag));
  for (const char* round : {"counts without flags", "counts in a reused workspace"}) {
    DeviceBuffer<unsigned long long> counts_only =
        to_device(std::vector<unsigned long long>(num_segments, kUntouchedCount));
    coverage_select(counts_only.data(), static_cast<uint8_t*>(nullptr), x.data(), num_segments,
                    size, gamma, filter, nullptr, workspace.data(), path);
    testing::synchronize();
    expect_equal(round, counts_only.download(), want.counts);
  }
  DeviceBuffer<uint8_t> flags_only = to_device(std::vector<uint8_t>(values.size(), kUntouchedFlag));
  coverage_select(static_cast<unsigned long long*>(nullptr), flags_only.data(), x.data(),
                  num_segments, size, gamma, filter, nullptr, workspace.data(), path);
  testing::synchronize();
  expect_equal("flags in a reused workspace", flags_only.download(), want.selected);
  const std::vector<uint8_t> after = workspace.download();
  expect_equal(
      "guard bytes after the workspace",
      std::vector<uint8_t>(after.begin() + static_cast<int64_t>(workspace_bytes), after.end()),
      std::vector<uint8_t>(kGuardBytes, kUntouchedFlag));
}

enum class Shape { kProbabilities, kWideRange, kFewLevels, kAllEqual, kZeros, kNearTies };

// Values of one kind, num_segments x size, each in [0, 1], each segment's sum below 1000 (the
// select's fixed-point totals need sums below 2^12).
template <typename T>
std::vector<T> make_values(Shape shape, int64_t num_segments, int64_t size, uint64_t seed) {
  Rng rng(seed);
  std::vector<T> values(num_segments * size);
  for (int64_t s = 0; s < num_segments; ++s) {
    T* x = values.data() + s * size;
    double total = 0.0;
    for (int64_t i = 0; i < size; ++i) {
      const double u = rng.uniform();
      switch (shape) {
        case Shape::kProbabilities: x[i] = static_cast<T>(u); break;
        case Shape::kWideRange:  // 2^-60 .. 1, and some exact zeros of either sign
          x[i] = u < 0.05 ? (i % 2 == 0 ? T{0} : -T{0})
                          : static_cast<T>(std::exp2(-60.0 * rng.uniform()));
          break;
        case Shape::kFewLevels:  // long runs of equal values
          x[i] = static_cast<T>(std::array<double, 4>{0.0, 0.25, 1.0 / 3.0, 0.5}[i % 7 % 4] /
                                static_cast<double>(size));
          break;
        case Shape::kAllEqual: x[i] = static_cast<T>(1.0 / static_cast<double>(size)); break;
        case Shape::kZeros: x[i] = T{0}; break;
        case Shape::kNearTies:  // distinct doubles, equal once rounded to fp32
          x[i] = static_cast<T>((0.5 + 1e-12 * static_cast<double>(i % 5)) /
                                static_cast<double>(size));
          break;
      }
      total += static_cast<double>(x[i]);
    }
    if (shape == Shape::kProbabilities && total > 0.0) {
      for (int64_t i = 0; i < size; ++i) x[i] = static_cast<T>(static_cast<double>(x[i]) / total);
    }
  }
  return values;
}

// Both paths at sizes that give the clusters path 1, 2, 4, 8 and 16 blocks a segment (on an H200;
// 16 at 70000, where the many-block path has 18 chunks), so that a cut inside a run of equal values
// spans chunks and blocks.
TEST(CoverageSelect, MatchesTheHostRule) {
  MF_REQUIRE_GPU();
  const Shape shapes[] = {Shape::kProbabilities, Shape::kWideRange, Shape::kFewLevels,
                          Shape::kAllEqual,      Shape::kZeros,     Shape::kNearTies};
  const char* names[] = {"probabilities", "wide range", "few levels",
                         "all equal",     "zeros",      "near ties"};
  const int64_t sizes[] = {1, 7, 4096, 8193, 20000, 33000, 70000};
  uint64_t seed = 1;
  for (int k = 0; k < 6; ++k) {
    for (int64_t size : sizes) {
      const int64_t num_segments = size > 33000 ? 2 : size > 4097 ? 3 : 5;
      std::vector<int32_t> active(num_segments, 1);
      active[1] = 0;
      const std::vector<float> f = make_values<float>(shapes[k], num_segments, size, seed);
      const std::vector<double> d = make_values<double>(shapes[k], num_segments, size, seed++);
      for (const SelectPath path : {SelectPath::many_blocks, SelectPath::clusters}) {
        if (path == SelectPath::clusters && cluster_select_size(size) == 0) continue;
        for (double gamma : {0.1, 0.5, 0.9, 1.0}) {
          expect_select_matches(std::string(names[k]) + " fp32", f, num_segments, size, gamma,
                                active, path);
          expect_select_matches(std::string(names[k]) + " fp64", d, num_segments, size, gamma,
                                active, path);
        }
      }
    }
  }
}

// Many segments at the search's sizes (step 2 at N = 20000 for 16 heads' two kinds; a step-8
// triangle of 313 blocks) with every segment active, and step 2 as the search filters it: the two
// segments of each head that is not query-aware.
TEST(CoverageSelect, ManySegmentsAtSearchSizes) {
  MF_REQUIRE_GPU();
  const int64_t num_tri = 313 * 314 / 2;
  const std::vector<float> vs = make_values<float>(Shape::kProbabilities, 32, 20000, 91);
  std::vector<int32_t> query_aware(16, 0);
  query_aware[0] = query_aware[5] = query_aware[15] = 1;
  const std::vector<double> tri = make_values<double>(Shape::kWideRange, 4, num_tri, 92);
  for (const SelectPath path : {SelectPath::many_blocks, SelectPath::clusters}) {
    const bool clusters = path == SelectPath::clusters;
    if (!clusters || cluster_select_size(20000) != 0) {
      expect_select_matches("step 2", vs, 32, 20000, 0.9, std::vector<int32_t>(32, 1), path);
      expect_select_matches("step 2, heads not query-aware", vs, 32, 20000, 0.9, query_aware, path,
                            2, true);
    }
    if (!clusters || cluster_select_size(num_tri) != 0) {
      expect_select_matches("step 8", tri, 4, num_tri, 0.9, std::vector<int32_t>(4, 1), path);
    }
  }
}

// The current device's compute capability major version.
int compute_capability_major() {
  int device = 0, major = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

// The clusters path's blocks a segment on Hopper: the fewest (up to 16) whose slices hold at most
// 16384 values.
TEST(CoverageSelect, ClusterSizesFollowTheSlices) {
  MF_REQUIRE_GPU();
  const int major = compute_capability_major();
  if (major != 9)
    GTEST_SKIP() << "the expected sizes are Hopper's (compute capability " << major << ")";
  const std::pair<int64_t, int> expected[] = {{1, 1},       {16384, 1},   {16385, 2}, {32768, 2},
                                              {32896, 4},   {65536, 4},   {65537, 8}, {131072, 8},
                                              {131328, 16}, {262144, 16}, {262145, 0}};
  for (const auto& [size, blocks] : expected) {
    EXPECT_EQ(cluster_select_size(size), blocks) << "size " << size;
  }
}

// On Hopper, automatic takes the clusters path where a segment's cluster has at most 4 blocks, many
// blocks elsewhere; asked for clusters, the select takes them wherever a cluster holds the segment.
TEST(CoverageSelect, AutomaticTakesClustersOfAtMostFourBlocks) {
  MF_REQUIRE_GPU();
  const int major = compute_capability_major();
  if (major != 9)
    GTEST_SKIP() << "the expected paths are Hopper's (compute capability " << major << ")";
  constexpr SelectPath kMany = SelectPath::many_blocks, kClusters = SelectPath::clusters;
  struct Expected {
    int64_t size;
    SelectPath automatic, clusters;
  };
  const Expected expected[] = {{1, kClusters, kClusters},     {32896, kClusters, kClusters},
                               {65536, kClusters, kClusters}, {65537, kMany, kClusters},
                               {131328, kMany, kClusters},    {262145, kMany, kMany}};
  for (const Expected& e : expected) {
    EXPECT_EQ(resolve_select_path(e.size, SelectPath::automatic), e.automatic) << e.size;
    EXPECT_EQ(resolve_select_path(e.size, kClusters), e.clusters) << e.size;
    EXPECT_EQ(resolve_select_path(e.size, kMany), kMany) << e.size;
  }
}

TEST(CoverageSelect, RejectsBadShapes) {
  MF_REQUIRE_GPU();
  DeviceBuffer<float> x(4);
  DeviceBuffer<unsigned long long> counts(1);
  EXPECT_THROW(coverage_select(counts.data(), static_cast<uint8_t*>(nullptr), x.data(), 1, 0, 0.9,
                               SegmentFilter{}, nullptr, nullptr),
               Error);
  EXPECT_THROW(coverage_select(counts.data(), static_cast<uint8_t*>(nullptr), x.data(), 0, 4, 0.9,
                               SegmentFilter{}, nullptr, nullptr),
               Error);
  DeviceBuffer<int32_t> flags(1);
  EXPECT_THROW(coverage_select(counts.data(), static_cast<uint8_t*>(nullptr), x.data(), 1, 4, 0.9,
                               SegmentFilter{flags.data(), 0, false}, nullptr, nullptr),
               Error);
  // Past 16 blocks of 16384 values (or on a device without clusters) the clusters path refuses
  // (coverage_select then takes the many-block path).
  const int64_t too_long = 16 * 16384 + 1;
  EXPECT_EQ(cluster_select_size(too_long), 0);
  DeviceBuffer<float> long_x(static_cast<size_t>(too_long));
  EXPECT_THROW(cluster_select(counts.data(), static_cast<uint8_t*>(nullptr), long_x.data(), 1,
                              too_long, 0.9, SegmentFilter{}, nullptr),
               Error);
  DeviceBuffer<uint8_t> workspace(coverage_select_workspace_bytes(1, 4) + 16);
  EXPECT_THROW(coverage_select(counts.data(), static_cast<uint8_t*>(nullptr), x.data(), 1, 4, 0.9,
                               SegmentFilter{}, nullptr, workspace.data() + 8),
               Error);
}

}  // namespace
}  // namespace moeforge::cuda
