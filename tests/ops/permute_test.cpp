// Tests of scatter/gather by row map: exact values on a hand-made map, dropped assignments, and
// finite-difference checks of both backward passes.
#include "ops/permute.h"

#include <gtest/gtest.h>

#include <vector>

#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

// 4 tokens, top-2, 3 experts, capacity 2: token 3 loses both assignments (see row_map_test).
const std::vector<int32_t> kExpertIdx = {2, 0, 0, 1, 1, 2, 0, 2};

TEST(Permute, ScatterAndGatherExact) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, 2);
  // row_token = {0, 1, 1, 2, 0, 2}; x row t = [t, 10 t].
  const std::vector<double> x = {0, 0, 1, 10, 2, 20, 3, 30};
  std::vector<double> rows(12);
  scatter_rows_forward<double>(rows.data(), x.data(), map, 2);
  EXPECT_EQ(rows, (std::vector<double>{0, 0, 1, 10, 1, 10, 2, 20, 0, 0, 2, 20}));

  // Row r = [r + 1, -(r + 1)]; assignment_row = {4, 0, 1, 2, 3, 5, -1, -1}.
  const std::vector<double> y = {1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6};
  const std::vector<double> gates = {0.5, 0.25, 2, 4, 8, 16, 32, 64};
  std::vector<double> out(8, 99.0);
  gather_rows_forward<double>(out.data(), y.data(), gates.data(), map, 2);
  EXPECT_EQ(out, (std::vector<double>{0.5 * 5 + 0.25 * 1, -(0.5 * 5 + 0.25 * 1), 2 * 2 + 4 * 3,
                                      -(2 * 2 + 4 * 3), 8 * 4 + 16 * 6, -(8 * 4 + 16 * 6), 0, 0}));

  // scatter backward sums the rows of each token; the fully dropped token gets 0.
  std::vector<double> dx(8, 99.0);
  scatter_rows_backward<double>(dx.data(), y.data(), map, 2);
  EXPECT_EQ(dx, (std::vector<double>{6, -6, 5, -5, 10, -10, 0, 0}));

  // gather backward: dgates of dropped assignments are 0, drows = gate * dout.
  const std::vector<double> dout = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<double> drows(12, 99.0), dgates(8, 99.0);
  gather_rows_backward<double>(drows.data(), dgates.data(), dout.data(), y.data(), gates.data(),
                               map, 2);
  EXPECT_EQ(dgates, (std::vector<double>{5 * 1 - 5 * 2, 1 * 1 - 1 * 2, 2 * 3 - 2 * 4, 3 * 3 - 3 * 4,
                                         4 * 5 - 4 * 6, 6 * 5 - 6 * 6, 0, 0}));
  EXPECT_EQ(drows, (std::vector<double>{0.25 * 1, 0.25 * 2, 2 * 3, 2 * 4, 4 * 3, 4 * 4, 8 * 5,
                                        8 * 6, 0.5 * 1, 0.5 * 2, 16 * 5, 16 * 6}));
}

TEST(Permute, FloatAndDoubleAgree) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, -1);
  const std::vector<double> y = testing::random_vector(8 * 5, 1);
  const std::vector<double> g = testing::random_vector(8, 2);
  std::vector<double> out(20);
  gather_rows_forward<double>(out.data(), y.data(), g.data(), map, 5);
  const std::vector<float> yf(y.begin(), y.end()), gf(g.begin(), g.end());
  std::vector<float> outf(20);
  gather_rows_forward<float>(outf.data(), yf.data(), gf.data(), map, 5);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(outf[i], out[i], 1e-6);
}

class PermuteGrad : public ::testing::TestWithParam<int64_t> {};

TEST_P(PermuteGrad, ScatterBackwardMatchesFiniteDifferences) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, GetParam());
  const int64_t c = 3;
  std::vector<double> x = testing::random_vector(4 * c, 3);
  const std::vector<double> r = testing::random_vector(map.num_rows() * c, 4);
  const auto loss = [&] {
    std::vector<double> rows(r.size());
    scatter_rows_forward<double>(rows.data(), x.data(), map, c);
    double l = 0.0;
    for (size_t i = 0; i < rows.size(); ++i) l += rows[i] * r[i];
    return l;
  };
  std::vector<double> dx(x.size());
  scatter_rows_backward<double>(dx.data(), r.data(), map, c);
  testing::expect_close(dx, testing::numerical_gradient(x, loss), 1e-9, 1e-7, "dx");
}

TEST_P(PermuteGrad, GatherBackwardMatchesFiniteDifferences) {
  const RowMap map = build_row_map(kExpertIdx.data(), 4, 2, 0, 3, GetParam());
  const int64_t c = 3;
  std::vector<double> rows = testing::random_vector(map.num_rows() * c, 5);
  std::vector<double> gates = testing::random_vector(8, 6);
  const std::vector<double> r = testing::random_vector(4 * c, 7);
  const auto loss = [&] {
    std::vector<double> out(r.size());
    gather_rows_forward<double>(out.data(), rows.data(), gates.data(), map, c);
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * r[i];
    return l;
  };
  std::vector<double> drows(rows.size()), dgates(gates.size());
  gather_rows_backward<double>(drows.data(), dgates.data(), r.data(), rows.data(), gates.data(),
                               map, c);
  testing::expect_close(drows, testing::numerical_gradient(rows, loss), 1e-9, 1e-7, "drows");
  testing::expect_close(dgates, testing::numerical_gradient(gates, loss), 1e-9, 1e-7, "dgates");
}

INSTANTIATE_TEST_SUITE_P(Capacity, PermuteGrad, ::testing::Values(-1, 2, 1));

}  // namespace
}  // namespace moeforge::ops
