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

// Chunk sums of one selection set's aggregated probabilities `agg[0, T_len)`, forced sink chunks (from
// the row's first real token `first`) and recent chunks, top-k chunks (ties: lower chunk first),
// expanded to sorted token positions. Returns the number written to out (<= max_sel).
inline int64_t chunks_to_positions(const float* agg, int64_t T_len, int64_t first, int64_t chunk, int64_t sink,
                                   int64_t recent, int64_t budget, int32_t* out, int64_t max_sel) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t C = chunk;
  const int64_t n_chunks = (T_len + C - 1) / C;
  std::vector<float> cs(n_chunks, 0.f);
  for (int64_t t = 0; t < T_len; ++t) cs[t / C] += agg[t];
  int64_t n_forced = 0;
  const int64_t recent_from = recent > 0 ? std::max<int64_t>(0, (T_len - recent) / C) : n_chunks;
  for (int64_t c = 0; c < n_chunks; ++c)
    if ((sink > 0 && c >= first / C && c * C < first + sink) || c >= recent_from) {
      cs[c] = inf;
      ++n_forced;
    }
  const int64_t kc = budget >= T_len ? n_chunks : std::min(n_chunks, std::max<int64_t>({1, n_forced, budget / C}));
  std::vector<int64_t> order(n_chunks);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + kc, order.end(), [&](int64_t a, int64_t c2) {
    return cs[a] > cs[c2] || (cs[a] == cs[c2] && a < c2);
  });
  std::sort(order.begin(), order.begin() + kc);
  int64_t n = 0;
  for (int64_t i = 0; i < kc; ++i)
    for (int64_t t = order[i] * C; t < std::min(T_len, (order[i] + 1) * C) && n < max_sel; ++t)
      out[n++] = static_cast<int32_t>(t);
  return n;
}

// Selection from logits an attention kernel already wrote (layer-reuse anchors): probabilities
// exp(logit - lse) (masked tokens hold -inf and give 0), then the same aggregation and chunk top-k
// as select_topk. Matches accel.policies._selection.select_from_scores (pool_kernel 0).
struct LogitSelectParams {
  const float* scores = nullptr;  // [B, H, stride]
  int64_t stride = 0;
  const float* lse = nullptr;     // [B, H]
  const int64_t* first = nullptr; // [B] first real token (left padding) or nullptr
  int64_t T = 0;
  int B = 0, H = 0, Hkv = 0;
  Agg agg = Agg::kMax;
  int64_t chunk = 1, sink = 0, recent = 0, budget = 0;
  int32_t* out = nullptr;     // [B, Hsel, max_sel], -1 padded
  int32_t* counts = nullptr;  // [B, Hsel]
  int64_t max_sel = 0;
};

inline void select_from_logits(const LogitSelectParams& p) {
  const int G = p.H / p.Hkv;
  const int Hsel = p.agg == Agg::kShared ? 1 : p.Hkv;
  std::vector<float> agg(std::max<int64_t>(p.T, 1));
  for (int b = 0; b < p.B; ++b) {
    for (int hs = 0; hs < Hsel; ++hs) {
      const int h0 = p.agg == Agg::kShared ? 0 : hs * G;
      const int h1 = p.agg == Agg::kShared ? p.H : (hs + 1) * G;
      std::fill(agg.begin(), agg.end(), 0.f);
      for (int h = h0; h < h1; ++h) {
        const float* sc = p.scores + (static_cast<int64_t>(b) * p.H + h) * p.stride;
        const float l = p.lse[static_cast<int64_t>(b) * p.H + h];
        const bool mx = p.agg == Agg::kMax || p.agg == Agg::kShared;
        int64_t t = 0;
        for (; t + 16 <= p.T; t += 16) {  // vectorised exp: -inf logits (masked tokens) give exactly 0
          const v16f e = fast_exp16(load16(sc + t) - splat16(l));
          const v16f a = load16(agg.data() + t);
          store16(agg.data() + t, mx ? vmax16(a, e) : a + e);
        }
        for (; t < p.T; ++t) {
          const float pr = sc[t] == -std::numeric_limits<float>::infinity() ? 0.f : fast_exp(sc[t] - l);
          agg[t] = mx ? std::max(agg[t], pr) : agg[t] + pr;
        }
      }
      if (p.agg == Agg::kMean)
        for (int64_t t = 0; t < p.T; ++t) agg[t] /= static_cast<float>(h1 - h0);
      int32_t* out = p.out + (static_cast<int64_t>(b) * Hsel + hs) * p.max_sel;
      std::fill(out, out + p.max_sel, -1);
      p.counts[b * Hsel + hs] = static_cast<int32_t>(chunks_to_positions(
          agg.data(), p.T, p.first ? p.first[b] : 0, p.chunk, p.sink, p.recent, p.budget, out, p.max_sel));
    }
  }
}

template <typename T>
void select_topk(const SelectParams& p) {
  const int G = p.H / p.Hkv;
  const int Hsel = p.agg == Agg::kShared ? 1 : p.Hkv;
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
      p.counts[b * Hsel + hs] = static_cast<int32_t>(
          chunks_to_positions(agg.data(), T_len, 0, p.chunk, p.sink, p.recent, p.budget, out, p.max_sel));
    }
  }
}

}  // namespace cpu
}  // namespace accel
