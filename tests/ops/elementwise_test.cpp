// Tests of ops::add and ops::add_inplace against a direct loop.
#include "ops/elementwise.h"

#include <gtest/gtest.h>

#include <vector>

#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::random_vector;

constexpr int64_t kLen = 37;

template <typename T>
void check_add() {
  const auto a_d = random_vector(kLen, 1);
  const auto b_d = random_vector(kLen, 2);
  const std::vector<T> a(a_d.begin(), a_d.end());
  const std::vector<T> b(b_d.begin(), b_d.end());
  std::vector<T> out(kLen, T(7));
  add<T>(out.data(), a.data(), b.data(), kLen);
  for (int64_t i = 0; i < kLen; ++i) EXPECT_EQ(out[i], a[i] + b[i]) << "index " << i;
}

template <typename T>
void check_add_inplace() {
  const auto dst_d = random_vector(kLen, 3);
  const auto src_d = random_vector(kLen, 4);
  std::vector<T> dst(dst_d.begin(), dst_d.end());
  const std::vector<T> src(src_d.begin(), src_d.end());
  const std::vector<T> before = dst;
  add_inplace<T>(dst.data(), src.data(), kLen);
  for (int64_t i = 0; i < kLen; ++i) EXPECT_EQ(dst[i], before[i] + src[i]) << "index " << i;
}

TEST(Elementwise, AddMatchesLoop) {
  check_add<float>();
  check_add<double>();
}

TEST(Elementwise, AddInplaceAccumulates) {
  check_add_inplace<float>();
  check_add_inplace<double>();
}

TEST(Elementwise, AddInplaceTwiceAddsTwice) {
  std::vector<double> dst(kLen, 1.0);
  const std::vector<double> src(kLen, 0.25);
  add_inplace<double>(dst.data(), src.data(), kLen);
  add_inplace<double>(dst.data(), src.data(), kLen);
  for (int64_t i = 0; i < kLen; ++i) EXPECT_EQ(dst[i], 1.5) << "index " << i;
}

}  // namespace
}  // namespace moeforge::ops
