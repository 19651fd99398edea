// MoE dispatch and combine on the GPU against ops/row_map.h and ops/permute.h, dropless and with
// a capacity that drops assignments: the row map bit for bit (inside the scratch its size function
// asks for), scatter_rows as an exact copy (zeros
// in the unused rows; bounded by a device row count, nothing past it), and scatter_rows_backward,
// combine_rows (with the residual) and combine_rows_backward against fp64.
#include "cuda/moe_dispatch.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "gpu_test_util.h"
#include "ops/permute.h"
#include "ops/row_map.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::expect_equal;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

struct DispatchCase {
  int64_t num_tokens, num_experts, top_k, c;
  int64_t capacity = -1;  // rows kept per expert; -1: dropless
};

// Each shape dropless and with capacity factor 0.5 (the routing below leaves a quarter of the
// experts empty, so the others overflow and drop).
const std::vector<DispatchCase> kCases = [] {
  const DispatchCase shapes[] = {
      {100, 8, 2, 96}, {37, 16, 4, 100}, {257, 16, 1, 64}, {1, 8, 2, 96}, {4096, 64, 8, 32},
  };
  std::vector<DispatchCase> cases;
  for (const DispatchCase& dc : shapes) {
    cases.push_back(dc);
    DispatchCase capped = dc;
    capped.capacity = ops::expert_capacity(0.5, dc.num_tokens, dc.top_k, dc.num_experts);
    cases.push_back(capped);
  }
  return cases;
}();

std::string describe(const DispatchCase& dc) {
  return "tokens=" + std::to_string(dc.num_tokens) + " experts=" + std::to_string(dc.num_experts) +
         " top_k=" + std::to_string(dc.top_k) + " c=" + std::to_string(dc.c) +
         " capacity=" + std::to_string(dc.capacity);
}

// top_k distinct experts per token, as a router picks them; the last quarter of the experts
// (at least one) gets no tokens, so empty experts are covered.
std::vector<int32_t> random_routing(const DispatchCase& dc, uint64_t seed) {
  const int64_t num_used =
      std::max<int64_t>(dc.top_k, dc.num_experts - std::max<int64_t>(1, dc.num_experts / 4));
  Rng rng(seed);
  std::vector<int32_t> expert_idx(dc.num_tokens * dc.top_k);
  std::vector<int32_t> experts(num_used);
  for (int64_t t = 0; t < dc.num_tokens; ++t) {
    std::iota(experts.begin(), experts.end(), 0);
    for (int64_t j = 0; j < dc.top_k; ++j) {
      const int64_t pick = j + static_cast<int64_t>(rng.below(static_cast<uint64_t>(num_used - j)));
      std::swap(experts[j], experts[pick]);
      expert_idx[t * dc.top_k + j] = experts[j];
    }
  }
  return expert_idx;
}

ops::RowMap reference_map(const std::vector<int32_t>& expert_idx, const DispatchCase& dc) {
  return ops::build_row_map(expert_idx.data(), dc.num_tokens, dc.top_k, 0, dc.num_experts,
                            dc.capacity);
}

// The row map's scratch, row_map_scratch_ints(num_assignments, num_experts) ints, and a guard of
// num_experts more (one tile's counts), all the 0xFF fill: expect_guard_kept checks that the map
// wrote nothing past the size the function gives.
DeviceBuffer<int32_t> guarded_scratch(int64_t num_assignments, int64_t num_experts) {
  DeviceBuffer<int32_t> scratch(
      static_cast<size_t>(row_map_scratch_ints(num_assignments, num_experts) + num_experts));
  testing::fill_garbage(scratch);
  return scratch;
}

void expect_guard_kept(const DeviceBuffer<int32_t>& scratch, int64_t num_experts) {
  const std::vector<int32_t> all = scratch.download();
  expect_equal("scratch guard", std::vector<int32_t>(all.end() - num_experts, all.end()),
               std::vector<int32_t>(num_experts, -1));
}

TEST(MoeDispatchCuda, RowMapEqualsTheReference) {
  MF_REQUIRE_GPU();
  uint64_t seed = 1;
  for (const DispatchCase& dc : kCases) {
    SCOPED_TRACE(describe(dc));
    const std::vector<int32_t> expert_idx = random_routing(dc, seed++);
    const ops::RowMap map = reference_map(expert_idx, dc);
    const std::vector<int32_t> offsets_ref(map.expert_offsets.begin(), map.expert_offsets.end());

    const int64_t num_assignments = dc.num_tokens * dc.top_k;
    DeviceBuffer<int32_t> expert_idx_dev = to_device(expert_idx);
    DeviceBuffer<int32_t> offsets(dc.num_experts + 1), assignment_row(num_assignments),
        row_token(num_assignments);
    testing::fill_garbage(offsets);
    testing::fill_garbage(assignment_row);
    testing::fill_garbage(row_token);
    DeviceBuffer<int32_t> scratch = guarded_scratch(num_assignments, dc.num_experts);
    build_row_map(offsets.data(), assignment_row.data(), row_token.data(), scratch.data(),
                  expert_idx_dev.data(), dc.num_tokens, dc.top_k, dc.num_experts, dc.capacity,
                  nullptr);
    testing::synchronize();
    expect_guard_kept(scratch, dc.num_experts);

    expect_equal("expert_offsets", offsets.download(), offsets_ref);
    expect_equal("assignment_row", assignment_row.download(), map.assignment_row);
    // The rows past the kept ones are unused: row_token -1.
    std::vector<int32_t> row_token_ref = map.row_token;
    row_token_ref.resize(num_assignments, -1);
    expect_equal("row_token", row_token.download(), row_token_ref);
    if (dc.capacity >= 0 && dc.num_tokens > 1) {
      EXPECT_GT(map.num_dropped, 0);
    }
  }
}

// Expert parallelism: the map of one rank's experts (a quarter, a half, or all of them; the
// first, a middle and the last slice), dropless and with the capacity, against ops::build_row_map
// over the same expert range: bit for bit, the other experts' assignments dropped.
TEST(MoeDispatchCuda, LocalRowMapEqualsTheReferenceOfItsExpertRange) {
  MF_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const DispatchCase& dc : kCases) {
    for (const int64_t ranks : {int64_t{1}, int64_t{2}, int64_t{4}}) {
      if (dc.num_experts % ranks != 0) continue;
      const int64_t num_local = dc.num_experts / ranks;
      for (const int64_t rank : {int64_t{0}, ranks / 2, ranks - 1}) {
        SCOPED_TRACE(describe(dc) + " rank " + std::to_string(rank) + " of " +
                     std::to_string(ranks));
        const std::vector<int32_t> expert_idx = random_routing(dc, seed++);
        const int64_t begin = rank * num_local;
        const ops::RowMap map = ops::build_row_map(expert_idx.data(), dc.num_tokens, dc.top_k,
                                                   begin, begin + num_local, dc.capacity);
        const int64_t num_assignments = dc.num_tokens * dc.top_k;
        DeviceBuffer<int32_t> expert_idx_dev = to_device(expert_idx);
        DeviceBuffer<int32_t> offsets(num_local + 1), assignment_row(num_assignments),
            row_token(num_assignments), local_idx(num_assignments);
        testing::fill_garbage(offsets);
        testing::fill_garbage(assignment_row);
        testing::fill_garbage(row_token);
        DeviceBuffer<int32_t> scratch = guarded_scratch(num_assignments, num_local);
        build_local_row_map(offsets.data(), assignment_row.data(), row_token.data(),
                            local_idx.data(), scratch.data(), expert_idx_dev.data(), dc.num_tokens,
                            dc.top_k, begin, num_local, dc.capacity, nullptr);
        testing::synchronize();
        expect_guard_kept(scratch, num_local);
        expect_equal("expert_offsets", offsets.download(),
                     std::vector<int32_t>(map.expert_offsets.begin(), map.expert_offsets.end()));
        expect_equal("assignment_row", assignment_row.download(), map.assignment_row);
        std::vector<int32_t> row_token_ref = map.row_token;
        row_token_ref.resize(num_assignments, -1);
        expect_equal("row_token", row_token.download(), row_token_ref);
      }
    }
  }
}

// A capacity carried across chunks (GPU inference runs the FFN in chunks of one call's tokens):
// the chunks' maps, built one after another with kept_before, keep and drop exactly the
// assignments the whole call's reference map does, and kept_before ends at the kept totals.
TEST(MoeDispatchCuda, RowMapCarriesTheCapacityAcrossChunks) {
  MF_REQUIRE_GPU();
  uint64_t seed = 50;
  for (const DispatchCase& dc : kCases) {
    if (dc.capacity < 0 || dc.num_tokens < 3) continue;
    SCOPED_TRACE(describe(dc));
    const std::vector<int32_t> expert_idx = random_routing(dc, seed++);
    const ops::RowMap whole = reference_map(expert_idx, dc);
    DeviceBuffer<int32_t> kept(dc.num_experts);
    kept.fill_zero(nullptr);
    const int64_t split = dc.num_tokens / 3;  // chunks of split and num_tokens - split tokens
    for (const auto& [first, count] :
         {std::pair<int64_t, int64_t>{0, split}, {split, dc.num_tokens - split}}) {
      const std::vector<int32_t> chunk_idx(expert_idx.begin() + first * dc.top_k,
                                           expert_idx.begin() + (first + count) * dc.top_k);
      DeviceBuffer<int32_t> chunk_dev = to_device(chunk_idx);
      DeviceBuffer<int32_t> offsets(dc.num_experts + 1), assignment_row(count * dc.top_k),
          row_token(count * dc.top_k),
          scratch(row_map_scratch_ints(count * dc.top_k, dc.num_experts));
      build_row_map(offsets.data(), assignment_row.data(), row_token.data(), scratch.data(),
                    chunk_dev.data(), count, dc.top_k, dc.num_experts, dc.capacity, nullptr,
                    kept.data());
      const std::vector<int32_t> rows = assignment_row.download();
      for (int64_t a = 0; a < count * dc.top_k; ++a) {
        EXPECT_EQ(rows[a] < 0, whole.assignment_row[first * dc.top_k + a] < 0)
            << "assignment " << first * dc.top_k + a;
      }
    }
    std::vector<int32_t> kept_ref(dc.num_experts);
    for (int64_t e = 0; e < dc.num_experts; ++e) {
      kept_ref[e] = static_cast<int32_t>(whole.expert_offsets[e + 1] - whole.expert_offsets[e]);
    }
    expect_equal("kept_before", kept.download(), kept_ref);
  }
}

// Inputs of one case: the routing, its reference map, and its assignment rows on the device.
struct Dispatch {
  ops::RowMap map;
  DeviceBuffer<int32_t> assignment_row;
};

Dispatch make_dispatch(const DispatchCase& dc, uint64_t seed) {
  Dispatch d;
  d.map = reference_map(random_routing(dc, seed), dc);
  d.assignment_row = to_device(d.map.assignment_row);
  return d;
}

TEST(MoeDispatchCuda, ScatterRowsCopiesExactly) {
  MF_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const DispatchCase& dc : kCases) {
    SCOPED_TRACE(describe(dc));
    Dispatch d = make_dispatch(dc, seed++);
    const std::vector<bf16> x = to_bf16(testing::random_normal(dc.num_tokens * dc.c, seed++));
    std::vector<float> rows_ref(d.map.num_rows() * dc.c);
    const std::vector<float> x_f = to_float(x);
    ops::scatter_rows_forward<float>(rows_ref.data(), x_f.data(), d.map, dc.c);
    // All n * k rows, as the engines scatter them: the unused ones (row_token -1) become zeros.
    const int64_t num_slots = dc.num_tokens * dc.top_k;
    std::vector<int32_t> row_token = d.map.row_token;
    row_token.resize(num_slots, -1);
    rows_ref.resize(num_slots * dc.c, 0.0f);

    DeviceBuffer<bf16> x_dev = to_device(x), rows(num_slots * dc.c);
    DeviceBuffer<int32_t> row_token_dev = to_device(row_token);
    testing::fill_garbage(rows);
    scatter_rows(rows.data(), x_dev.data(), row_token_dev.data(), num_slots, dc.c, nullptr);
    testing::synchronize();
    expect_equal("rows", to_float(rows.download()), rows_ref);
  }
}

// Bounded by used rows on the device (expert parallelism: the local experts' rows, the rest of
// the n * k unused) for used 0, 1, half the kept rows, the kept rows, one more (an unused row,
// row_token -1) and all n * k: the rows [0, used) as the unbounded scatter writes them (copies, or
// zeros for row_token -1), the rows past them keep the 0xFF fill. c = 96, 64 and 32 take the
// vector kernel, 100 the scalar one.
TEST(MoeDispatchCuda, ScatterRowsWritesOnlyTheUsedRows) {
  MF_REQUIRE_GPU();
  uint64_t seed = 150;
  for (const DispatchCase& dc : kCases) {
    SCOPED_TRACE(describe(dc));
    Dispatch d = make_dispatch(dc, seed++);
    const std::vector<bf16> x = to_bf16(testing::random_normal(dc.num_tokens * dc.c, seed++));
    const int64_t num_slots = dc.num_tokens * dc.top_k, kept = d.map.num_rows();
    std::vector<float> rows_ref(kept * dc.c);
    ops::scatter_rows_forward<float>(rows_ref.data(), to_float(x).data(), d.map, dc.c);
    rows_ref.resize(num_slots * dc.c, 0.0f);
    const std::vector<bf16> all_rows = to_bf16(rows_ref);
    std::vector<int32_t> row_token = d.map.row_token;
    row_token.resize(num_slots, -1);

    DeviceBuffer<bf16> x_dev = to_device(x);
    DeviceBuffer<int32_t> row_token_dev = to_device(row_token);
    for (const int64_t used :
         {int64_t{0}, int64_t{1}, kept / 2, kept, std::min(kept + 1, num_slots), num_slots}) {
      SCOPED_TRACE("used=" + std::to_string(used));
      DeviceBuffer<int32_t> used_rows = to_device(std::vector<int32_t>{static_cast<int32_t>(used)});
      DeviceBuffer<bf16> rows(num_slots * dc.c);
      testing::fill_garbage(rows);
      scatter_rows(rows.data(), x_dev.data(), row_token_dev.data(), used_rows.data(), num_slots,
                   dc.c, nullptr);
      testing::synchronize();
      std::vector<bf16> rows_want(num_slots * dc.c, testing::bf16_from_bits(0xFFFF));
      std::copy(all_rows.begin(), all_rows.begin() + used * dc.c, rows_want.begin());
      expect_equal("rows", rows.download(), rows_want);
    }
  }
}

TEST(MoeDispatchCuda, ScatterRowsBackwardSumsTheSlots) {
  MF_REQUIRE_GPU();
  uint64_t seed = 200;
  for (const DispatchCase& dc : kCases) {
    SCOPED_TRACE(describe(dc));
    Dispatch d = make_dispatch(dc, seed++);
    const int64_t num_rows = d.map.num_rows();
    const std::vector<bf16> drows = to_bf16(testing::random_normal(num_rows * dc.c, seed++));
    const std::vector<double> drows_d = to_double(drows);
    std::vector<double> dx_ref(dc.num_tokens * dc.c);
    ops::scatter_rows_backward<double>(dx_ref.data(), drows_d.data(), d.map, dc.c);
    // fp32 sum of top_k terms.
    std::vector<double> noise(dx_ref.size(), 0.0);
    for (int64_t r = 0; r < num_rows; ++r) {
      const int64_t t = d.map.row_token[r];
      for (int64_t i = 0; i < dc.c; ++i) {
        noise[t * dc.c + i] += (dc.top_k + 1) * kFloatEps * std::abs(drows_d[r * dc.c + i]);
      }
    }

    DeviceBuffer<bf16> drows_dev = to_device(drows);
    DeviceBuffer<float> dx(dc.num_tokens * dc.c);
    testing::fill_garbage(dx);
    scatter_rows_backward(dx.data(), drows_dev.data(), d.assignment_row.data(), dc.num_tokens,
                          dc.top_k, dc.c, nullptr);
    expect_close("dx", download_double(dx), dx_ref, noise);
  }
}

TEST(MoeDispatchCuda, CombineRowsAddsGatedRowsToTheResidual) {
  MF_REQUIRE_GPU();
  uint64_t seed = 300;
  for (const DispatchCase& dc : kCases) {
    SCOPED_TRACE(describe(dc));
    Dispatch d = make_dispatch(dc, seed++);
    const int64_t num_rows = d.map.num_rows();
    const std::vector<bf16> rows = to_bf16(testing::random_normal(num_rows * dc.c, seed++));
    const std::vector<float> gates =
        testing::random_uniform(dc.num_tokens * dc.top_k, seed++, 0.0, 1.0);
    const std::vector<float> residual = testing::random_normal(dc.num_tokens * dc.c, seed++, 3.0);
    const std::vector<double> rows_d = to_double(rows), gates_d = to_double(gates);
    std::vector<double> out_ref(dc.num_tokens * dc.c);
    ops::gather_rows_forward<double>(out_ref.data(), rows_d.data(), gates_d.data(), d.map, dc.c);
    std::vector<double> noise(out_ref.size());
    for (int64_t i = 0; i < dc.num_tokens * dc.c; ++i) {
      out_ref[i] += residual[i];
      noise[i] = std::abs(residual[i]);
    }
    for (int64_t a = 0; a < dc.num_tokens * dc.top_k; ++a) {
      const int64_t t = a / dc.top_k, r = d.map.assignment_row[a];
      if (r < 0) continue;  // dropped
      for (int64_t i = 0; i < dc.c; ++i)
        noise[t * dc.c + i] += std::abs(gates_d[a] * rows_d[r * dc.c + i]);
    }
    // fp32: top_k products and top_k + 1 additions.
    for (double& v : noise) v *= (2 * dc.top_k + 2) * kFloatEps;

    DeviceBuffer<bf16> rows_dev = to_device(rows);
    DeviceBuffer<float> gates_dev = to_device(gates), residual_dev = to_device(residual),
                        out(dc.num_tokens * dc.c);
    testing::fill_garbage(out);
    combine_rows(out.data(), residual_dev.data(), rows_dev.data(), gates_dev.data(),
                 d.assignment_row.data(), dc.num_tokens, dc.top_k, dc.c, nullptr);
    expect_close("out", download_double(out), out_ref, noise);
  }
}

TEST(MoeDispatchCuda, CombineRowsBackwardMatchesGatherBackward) {
  MF_REQUIRE_GPU();
  uint64_t seed = 400;
  for (const DispatchCase& dc : kCases) {
    SCOPED_TRACE(describe(dc));
    Dispatch d = make_dispatch(dc, seed++);
    const int64_t num_rows = d.map.num_rows();
    const std::vector<bf16> rows = to_bf16(testing::random_normal(num_rows * dc.c, seed++));
    const std::vector<float> gates =
        testing::random_uniform(dc.num_tokens * dc.top_k, seed++, 0.0, 1.0);
    const std::vector<float> dout = testing::random_normal(dc.num_tokens * dc.c, seed++);
    const std::vector<double> rows_d = to_double(rows), gates_d = to_double(gates),
                              dout_d = to_double(dout);
    std::vector<double> drows_ref(num_rows * dc.c), dgates_ref(dc.num_tokens * dc.top_k);
    ops::gather_rows_backward<double>(drows_ref.data(), dgates_ref.data(), dout_d.data(),
                                      rows_d.data(), gates_d.data(), d.map, dc.c);
    // drows: one fp32 product; dgates: a dot product of length c.
    std::vector<double> drows_noise(drows_ref.size()), dgates_noise(dgates_ref.size());
    for (size_t i = 0; i < drows_ref.size(); ++i)
      drows_noise[i] = 2.0 * kFloatEps * std::abs(drows_ref[i]);
    for (int64_t a = 0; a < dc.num_tokens * dc.top_k; ++a) {
      const int64_t t = a / dc.top_k, r = d.map.assignment_row[a];
      if (r < 0) continue;  // dropped: dgates 0 exactly
      double mag = 0.0;
      for (int64_t i = 0; i < dc.c; ++i)
        mag += std::abs(dout_d[t * dc.c + i] * rows_d[r * dc.c + i]);
      dgates_noise[a] = (dc.c + 4) * kFloatEps * mag;
    }

    DeviceBuffer<bf16> rows_dev = to_device(rows), drows(num_rows * dc.c);
    DeviceBuffer<float> gates_dev = to_device(gates), dout_dev = to_device(dout),
                        dgates(dc.num_tokens * dc.top_k);
    testing::fill_garbage(drows);
    testing::fill_garbage(dgates);
    combine_rows_backward(drows.data(), dgates.data(), dout_dev.data(), rows_dev.data(),
                          gates_dev.data(), d.assignment_row.data(), dc.num_tokens, dc.top_k, dc.c,
                          nullptr);
    expect_close("drows", download_double(drows), drows_ref,
                 testing::bf16_bound(drows_ref, drows_noise));
    expect_close("dgates", download_double(dgates), dgates_ref, dgates_noise);
  }
}

}  // namespace
}  // namespace moeforge::cuda
