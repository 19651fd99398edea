// The fp64 reference checks of causal GQA attention shared by the tests of cuda::Attention's
// backends (attention_test.cpp: cuDNN; attention_fallback_test.cpp: ours): ops/attention.h in fp64
// on the same bf16 q, k, v, dout; out, dq, dk, dv by FlashAttention's rule (error <= 2 * the error
// of the same math in bf16 + a small floor) and the log-sum-exp against an fp64 logsumexp of the
// scaled scores within the fp32 noise of computing it.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "gpu_test_util.h"
#include "ops/attention.h"

// Its own namespace: every tests/cuda file links into one binary, and another helper header with
// a testing::Inputs of its own would break the one-definition rule silently.
namespace moeforge::cuda::testing::attention {

// Floor of the noise rule: the kernels' fp32 noise where the bf16 math is exact (seq 1, the
// first query row).
inline constexpr double kFloor = 1e-4;

inline std::string describe(const AttentionShape& s) {
  return "batch=" + std::to_string(s.batch) + " seq=" + std::to_string(s.seq) +
         " heads=" + std::to_string(s.num_q_heads) + "/" + std::to_string(s.num_kv_heads) +
         " head_dim=" + std::to_string(s.head_dim);
}

// The inputs of one case, as bf16 tensors and as the doubles they hold.
struct Inputs {
  std::vector<bf16> q, k, v, dout;
  std::vector<double> q_d, k_d, v_d, dout_d;
};

inline Inputs make_inputs(const AttentionShape& s, uint64_t seed) {
  const int64_t q_count = s.batch * s.seq * s.num_q_heads * s.head_dim;
  const int64_t kv_count = s.batch * s.seq * s.num_kv_heads * s.head_dim;
  Inputs in;
  in.q = to_bf16(random_normal(q_count, seed, 1.5));
  in.k = to_bf16(random_normal(kv_count, seed + 1));
  in.v = to_bf16(random_normal(kv_count, seed + 2));
  in.dout = to_bf16(random_normal(q_count, seed + 3));
  in.q_d = to_double(in.q);
  in.k_d = to_double(in.k);
  in.v_d = to_double(in.v);
  in.dout_d = to_double(in.dout);
  return in;
}

// The same attention with the roundings of a bf16 implementation (FlashAttention's test
// reference: q * scale, the scores, the probabilities, dP, dS and every output rounded to bf16;
// dk and dv of each query head rounded before the group's sum).
struct LowPrecision {
  std::vector<double> out, dq, dk, dv;
};

inline LowPrecision low_precision_attention(const Inputs& in, const AttentionShape& s) {
  const int64_t seq = s.seq, d = s.head_dim, hq = s.num_q_heads, hkv = s.num_kv_heads;
  const int64_t group = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto q_at = [&](int64_t b, int64_t i, int64_t h) { return ((b * seq + i) * hq + h) * d; };
  auto kv_at = [&](int64_t b, int64_t j, int64_t h) { return ((b * seq + j) * hkv + h) * d; };
  LowPrecision lp;
  lp.out.assign(in.q_d.size(), 0.0);
  lp.dq.assign(in.q_d.size(), 0.0);
  lp.dk.assign(in.k_d.size(), 0.0);
  lp.dv.assign(in.v_d.size(), 0.0);
  std::vector<double> qs(d), p(seq), dp(seq), acc(d);
  std::vector<double> dk_head(seq * d), dv_head(seq * d);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t kv_head = h / group;
      std::fill(dk_head.begin(), dk_head.end(), 0.0);
      std::fill(dv_head.begin(), dv_head.end(), 0.0);
      for (int64_t i = 0; i < seq; ++i) {
        const double* q = in.q_d.data() + q_at(b, i, h);
        const double* dout = in.dout_d.data() + q_at(b, i, h);
        for (int64_t x = 0; x < d; ++x) qs[x] = bf16_round(q[x] * scale);
        double max_score = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = in.k_d.data() + kv_at(b, j, kv_head);
          double dot = 0.0;
          for (int64_t x = 0; x < d; ++x) dot += qs[x] * k[x];
          p[j] = bf16_round(dot);
          max_score = std::max(max_score, p[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(p[j] - max_score);
        for (int64_t j = 0; j <= i; ++j) p[j] = bf16_round(std::exp(p[j] - max_score) / sum);
        // out = P V.
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j <= i; ++j) {
          const double* v = in.v_d.data() + kv_at(b, j, kv_head);
          for (int64_t x = 0; x < d; ++x) acc[x] += p[j] * v[x];
        }
        for (int64_t x = 0; x < d; ++x) lp.out[q_at(b, i, h) + x] = bf16_round(acc[x]);
        // dP = dout V^T, dS = P (dP - rowsum(P dP)).
        double p_dot_dp = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          const double* v = in.v_d.data() + kv_at(b, j, kv_head);
          double dot = 0.0;
          for (int64_t x = 0; x < d; ++x) dot += dout[x] * v[x];
          dp[j] = bf16_round(dot);
          p_dot_dp += p[j] * dp[j];
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = bf16_round(p[j] * (dp[j] - p_dot_dp));
          const double* k = in.k_d.data() + kv_at(b, j, kv_head);
          for (int64_t x = 0; x < d; ++x) {
            acc[x] += ds * k[x];
            dk_head[j * d + x] += ds * qs[x];
            dv_head[j * d + x] += p[j] * dout[x];
          }
        }
        for (int64_t x = 0; x < d; ++x) {
          lp.dq[q_at(b, i, h) + x] = bf16_round(bf16_round(acc[x]) * scale);
        }
      }
      for (int64_t j = 0; j < seq; ++j) {
        for (int64_t x = 0; x < d; ++x) {
          lp.dk[kv_at(b, j, kv_head) + x] += bf16_round(dk_head[j * d + x]);
          lp.dv[kv_at(b, j, kv_head) + x] += bf16_round(dv_head[j * d + x]);
        }
      }
    }
  }
  for (double& x : lp.dk) x = bf16_round(x);
  for (double& x : lp.dv) x = bf16_round(x);
  return lp;
}

// lse [batch, num_q_heads, seq] in fp64, and its fp32 noise: the scores' fp32 dot products
// (head_dim products of at most max_j sum |q k|) and an approximate exp and log.
inline void reference_lse(const Inputs& in, const AttentionShape& s, std::vector<double>& lse,
                          std::vector<double>& noise) {
  const int64_t seq = s.seq, d = s.head_dim, hq = s.num_q_heads, hkv = s.num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  lse.assign(s.batch * hq * seq, 0.0);
  noise.assign(lse.size(), 0.0);
  std::vector<double> scores(seq);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t kv_head = h / (hq / hkv);
      for (int64_t i = 0; i < seq; ++i) {
        const double* q = in.q_d.data() + ((b * seq + i) * hq + h) * d;
        double max_score = -INFINITY, max_mag = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = in.k_d.data() + ((b * seq + j) * hkv + kv_head) * d;
          double dot = 0.0, mag = 0.0;
          for (int64_t x = 0; x < d; ++x) {
            dot += q[x] * k[x];
            mag += std::abs(q[x] * k[x]);
          }
          scores[j] = scale * dot;
          max_score = std::max(max_score, scores[j]);
          max_mag = std::max(max_mag, scale * mag);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(scores[j] - max_score);
        const int64_t row = (b * hq + h) * seq + i;
        lse[row] = max_score + std::log(sum);
        noise[row] = (d + 8) * 2.0 * kFloatEps * max_mag + 0x1.0p-18 * (1.0 + std::abs(lse[row]));
      }
    }
  }
}

// Runs attention's forward and backward on random inputs of shape s (from seed) into outputs filled
// with NaN, and checks out, lse, dq, dk and dv against the fp64 reference.
inline void expect_attention_matches_reference(Attention& attention, const AttentionShape& s,
                                               uint64_t seed) {
  SCOPED_TRACE(describe(s));
  const Inputs in = make_inputs(s, seed);
  const ops::AttentionDims dims{s.batch, s.seq, s.seq, s.num_q_heads, s.num_kv_heads, s.head_dim};
  std::vector<double> out_ref(in.q_d.size());
  std::vector<double> probs(s.batch * s.num_q_heads * s.seq * s.seq);
  ops::attention_forward<double>(out_ref.data(), probs.data(), in.q_d.data(), in.k_d.data(),
                                 in.v_d.data(), dims);
  std::vector<double> dq_ref(in.q_d.size()), dk_ref(in.k_d.size()), dv_ref(in.v_d.size());
  ops::attention_backward<double>(dq_ref.data(), dk_ref.data(), dv_ref.data(), in.dout_d.data(),
                                  in.q_d.data(), in.k_d.data(), in.v_d.data(), probs.data(), dims);
  std::vector<double> lse_ref, lse_noise;
  reference_lse(in, s, lse_ref, lse_noise);
  const LowPrecision lp = low_precision_attention(in, s);

  DeviceBuffer<bf16> q = to_device(in.q), k = to_device(in.k), v = to_device(in.v),
                     dout = to_device(in.dout);
  DeviceBuffer<bf16> out(in.q.size()), dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  DeviceBuffer<float> lse(lse_ref.size());
  for (DeviceBuffer<bf16>* buffer : {&out, &dq, &dk, &dv}) fill_garbage(*buffer);
  fill_garbage(lse);
  attention.forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s, nullptr);
  attention.backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                     out.data(), lse.data(), s, nullptr);

  expect_within_noise("out", download_double(out), out_ref, lp.out, kFloor);
  expect_close("lse", download_double(lse), lse_ref, lse_noise);
  expect_within_noise("dq", download_double(dq), dq_ref, lp.dq, kFloor);
  expect_within_noise("dk", download_double(dk), dk_ref, lp.dk, kFloor);
  expect_within_noise("dv", download_double(dv), dv_ref, lp.dv, kFloor);
}

}  // namespace moeforge::cuda::testing::attention
