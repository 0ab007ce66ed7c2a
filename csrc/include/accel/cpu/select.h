// Token selection for sparse decode, CPU. Torch-free.
//
// For one decode query per sequence: exact attention probabilities of every query head over the
// first `length` tokens, aggregated over the G query heads of a KV head (max / mean / sum; HyLRA's
// profiler and RefreshKV) or over all heads of the layer (shared; DELTA's unified selection),
// summed into chunks (pages) of `chunk` tokens, top-k chunks with the sink and recent chunks forced
// in (score +inf), expanded back to token positions, sorted ascending. Matches
// accel.ops._selection_reference.select_topk_ref.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "accel/cpu/vec_math.h"

namespace accel {
namespace cpu {

enum class Agg { kMax = 0, kMean = 1, kSum = 2, kShared = 3 };

struct SelectParams {
  const float* q = nullptr;  // [B, H, D]
  const void* k = nullptr;   // (b, h, t, d) at b*k_sb + h*k_sh + t*k_st + d
  int64_t k_sb = 0, k_sh = 0, k_st = 0;
  const int32_t* lengths = nullptr;  // [B] tokens considered per sequence
  int B = 0, H = 0, Hkv = 0, D = 0;
  float scale = 1.f;
  Agg agg = Agg::kMax;
  int chunk = 1, sink = 0, recent = 0;
  int64_t budget = 0;       // tokens, including forced ones
  int32_t* out = nullptr;   // [B, Hsel, max_sel], -1 padded
  int32_t* counts = nullptr;  // [B, Hsel]
  int64_t max_sel = 0;
};

template <typename T>
static void head_probs(const SelectParams& p, int b, int h, int64_t T_len, float* prob) {
  const int G = p.H / p.Hkv;
  const int kh = h / G;
  const float* q = p.q + (static_cast<int64_t>(b) * p.H + h) * p.D;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < T_len; ++t) {
    const T* kr = kb + t * p.k_st;
    float dot = 0.f;
    if (p.D % 16 == 0) {
      v16f a{};
      for (int d = 0; d < p.D; d += 16) a += load16(q + d) * load16(kr + d);
      dot = hsum16(a);
    } else {
      for (int d = 0; d < p.D; ++d) dot += q[d] * Load<T>::get(kr, d);
    }
    prob[t] = dot * p.scale;
    mx = std::max(mx, prob[t]);
  }
  float sum = 0.f;
  for (int64_t t = 0; t < T_len; ++t) {
    prob[t] = std::exp(prob[t] - mx);
    sum += prob[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < T_len; ++t) prob[t] *= inv;
}

template <typename T>
void select_topk(const SelectParams& p) {
  const int G = p.H / p.Hkv;
  const int Hsel = p.agg == Agg::kShared ? 1 : p.Hkv;
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int b = 0; b < p.B; ++b) {
    for (int hs = 0; hs < Hsel; ++hs) {
      const int64_t T_len = p.lengths[b];
      int32_t* out = p.out + (static_cast<int64_t>(b) * Hsel + hs) * p.max_sel;
      std::fill(out, out + p.max_sel, -1);
      if (T_len <= 0) {
        p.counts[b * Hsel + hs] = 0;
        continue;
      }
      std::vector<float> agg(T_len, 0.f), prob(T_len);
      const int h0 = p.agg == Agg::kShared ? 0 : hs * G;
      const int h1 = p.agg == Agg::kShared ? p.H : (hs + 1) * G;
      for (int h = h0; h < h1; ++h) {
        head_probs<T>(p, b, h, T_len, prob.data());
        if (p.agg == Agg::kMax || p.agg == Agg::kShared)
          for (int64_t t = 0; t < T_len; ++t) agg[t] = std::max(agg[t], prob[t]);
        else
          for (int64_t t = 0; t < T_len; ++t) agg[t] += prob[t];
      }
      if (p.agg == Agg::kMean)
        for (int64_t t = 0; t < T_len; ++t) agg[t] /= static_cast<float>(h1 - h0);
      const int64_t C = p.chunk;
      const int64_t n_chunks = (T_len + C - 1) / C;
      std::vector<float> cs(n_chunks, 0.f);
      for (int64_t t = 0; t < T_len; ++t) cs[t / C] += agg[t];
      int64_t n_forced = 0;
      const int64_t sink_chunks = (p.sink + C - 1) / C;
      const int64_t recent_from = p.recent > 0 ? std::max<int64_t>(0, (T_len - p.recent) / C) : n_chunks;
      for (int64_t c = 0; c < n_chunks; ++c)
        if (c < sink_chunks || c >= recent_from) {
          cs[c] = inf;
          ++n_forced;
        }
      int64_t kc = p.budget >= T_len ? n_chunks
                                     : std::min(n_chunks, std::max<int64_t>({1, n_forced, p.budget / C}));
      std::vector<int64_t> order(n_chunks);
      std::iota(order.begin(), order.end(), 0);
      // top-kc by score; ties broken by lower chunk index (deterministic)
      std::partial_sort(order.begin(), order.begin() + kc, order.end(), [&](int64_t a, int64_t c2) {
        return cs[a] > cs[c2] || (cs[a] == cs[c2] && a < c2);
      });
      std::sort(order.begin(), order.begin() + kc);
      int64_t n = 0;
      for (int64_t i = 0; i < kc; ++i)
        for (int64_t t = order[i] * C; t < std::min(T_len, (order[i] + 1) * C) && n < p.max_sel; ++t)
          out[n++] = static_cast<int32_t>(t);
      p.counts[b * Hsel + hs] = static_cast<int32_t>(n);
    }
  }
}

}  // namespace cpu
}  // namespace accel
