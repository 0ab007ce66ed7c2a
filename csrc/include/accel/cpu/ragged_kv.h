// Decode-time bookkeeping of accel's ragged (compressed) KV cache on raw pointers: append one token per head,
// add each kept token's decode attention to its eviction score, evict every head down to its budget.
// Torch-free, so the per-layer launchers (src/kv_cpu.cpp) and the whole-stack decode step
// (src/fused_decode_cpu.cpp) run the same code. Layout and semantics: python/accel/cache/ragged.py.
//
// A layer's pool: rows of kb (K) and vb (V) bytes; head bh = b*Hkv + h owns rows
// [offsets[bh], offsets[bh] + caps[bh]), its live tokens are the first lengths[bh] of them; pos[row] is the
// token's absolute position (-1: unused), score[row] its eviction score.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "accel/cpu/vec_math.h"

namespace accel {
namespace cpu {

// rows from which a layer's eviction (the rows of the heads that evict) or score accumulation (every head's rows) is
// split over the caller's OpenMP threads: below it the fork and join (a few microseconds) costs more than the work it
// shares (~0.5 ns a row on one thread). Heads own disjoint rows (the pool's layout), so they run independently.
constexpr int64_t kRaggedParallelRows = 32768;

// whether every head has a spare row for one more token
inline bool ragged_has_room(const int32_t* len, const int64_t* cap, int64_t BH) {
  for (int64_t bh = 0; bh < BH; ++bh)
    if (len[bh] >= cap[bh]) return false;
  return true;
}

// append row bh of new_k / new_v (kb / vb bytes each) at the end of head bh's live rows, at `position`, score 0
// (the caller checked ragged_has_room)
inline void ragged_append_rows(char* kp, char* vp, int64_t kb, int64_t vb, int64_t* ps, float* sc, const int64_t* off,
                               int32_t* len, const char* new_k, const char* new_v, int64_t BH, int64_t position) {
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t row = off[bh] + len[bh];
    std::memcpy(kp + row * kb, new_k + bh * kb, kb);
    std::memcpy(vp + row * vb, new_v + bh * vb, vb);
    ps[row] = position;
    sc[row] = 0.f;
    len[bh] += 1;
  }
}

// score[offsets[bh] + t] += mean over the G query heads of head bh of exp(logits[b, h, t] - lse[b, h]) for
// t < lengths[bh] (H2O-style accumulated attention; logits [B, H, W] from the decode kernel's scores output).
// The exponentials are the kernels' fast_exp (relative error ~2e-7), 16 tokens at a time, each token's score gaining
// its heads' terms in head order (terms below e^-87 become ~1.6e-38, -inf exactly 0). With a scalar std::exp per
// token and head this loop took 2.08 ms a step for 30 layers x 3 KV heads x 4081 kept tokens at batch 1 (0.155 ms
// now, AMD EPYC, scratch harness, 2026-12-07); at batch 8 and 8K, snapkv and auto at a 50% budget decoded 22-25%
// faster after the change (accel bench, one run each, within a machine spread of up to ~15%). Heads are independent:
// a large batch of them is split over OpenMP threads, as in ragged_evict_rows.
inline void ragged_accumulate_rows(const float* lg, int64_t W, const float* ls, const int64_t* off, const int32_t* len,
                                   float* sc, int64_t B, int64_t H, int64_t Hkv) {
  const int64_t G = H / Hkv;
  const float inv = 1.f / static_cast<float>(G);
  const v16f iv = splat16(inv);
  int64_t work = 0;
  for (int64_t bh = 0; bh < B * Hkv; ++bh) work += len[bh];
#pragma omp parallel for schedule(static) if (B * Hkv > 1 && work >= kRaggedParallelRows)
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int64_t b = bh / Hkv, kh = bh % Hkv;
    const float* lgh = lg + (b * H + kh * G) * W;  // the group's G rows of logits
    const float* lsh = ls + b * H + kh * G;        // and their log-sum-exps
    bool any = false;  // heads with nothing attended (lse not finite) add nothing
    for (int64_t g = 0; g < G; ++g) any = any || std::isfinite(lsh[g]);
    if (!any) continue;
    float* s = sc + off[bh];
    const int64_t n = len[bh];
    int64_t t = 0;
#if defined(__AVX2__)
    for (; t + 16 <= n; t += 16) {
      v16f acc = load16(s + t);
      for (int64_t g = 0; g < G; ++g)
        if (std::isfinite(lsh[g])) acc += fast_exp16(load16(lgh + g * W + t) - splat16(lsh[g])) * iv;
      store16(s + t, acc);
    }
    for (; t < n; ++t)
      for (int64_t g = 0; g < G; ++g) {
        if (!std::isfinite(lsh[g])) continue;
        const float x = lgh[g * W + t] - lsh[g];  // -inf gives exactly 0, as in the vector body
        s[t] += (x == -std::numeric_limits<float>::infinity() ? 0.f : fast_exp(x)) * inv;
      }
#else
    // baseline x86-64 (SSE2) builds: the 16-lane vectors are emulated there and ran 2x slower than libm's expf
    (void)iv;
    for (; t < n; ++t)
      for (int64_t g = 0; g < G; ++g)
        if (std::isfinite(lsh[g])) s[t] += std::exp(lgh[g * W + t] - lsh[g]) * inv;
#endif
  }
}

// The first j < n with pred(j), -1 if none: 16 rows a block tested without branches (a loop the compiler
// vectorises), the block that holds a match then row by row.
template <typename Pred>
inline int64_t first_match(int64_t n, Pred pred) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t t = 0; t < 16; ++t) hit |= static_cast<int>(pred(j + t));
    if (hit) break;
  }
  for (; j < n; ++j)
    if (pred(j)) return j;
  return -1;
}

// One head's eviction victim (index among its n live rows ps[0..n) / sc[0..n)) under ragged_evict_rows' rule, by
// two scalar passes: the newest position, then the lowest score (by_age: the oldest position) among the
// rows that are neither sinks (pos < se) nor among the rc newest positions, the first such row on ties; if no row is
// eligible, the oldest non-sink row, else the oldest row. The reference of ragged_evict_victim's vector passes.
inline int64_t ragged_evict_victim_scalar(const int64_t* ps, const float* sc, int64_t n, int64_t se, int64_t rc,
                                          bool by_age) {
  int64_t newest = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < n; ++i) newest = std::max(newest, ps[i]);
  int64_t best = -1, fb = -1, oldest = -1;
  float best_s = std::numeric_limits<float>::infinity();
  int64_t best_p = std::numeric_limits<int64_t>::max(), fb_p = best_p, old_p = best_p;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = ps[i];
    if (p < old_p) { old_p = p; oldest = i; }
    if (p < se) continue;
    if (p < fb_p) { fb_p = p; fb = i; }
    if (p > newest - rc) continue;
    if (by_age) {
      if (p < best_p) { best_p = p; best = i; }
    } else if (sc[i] < best_s || best < 0) {
      best_s = sc[i];
      best = i;
    }
  }
  return best >= 0 ? best : (fb >= 0 ? fb : oldest);
}

// The same victim from branch-free reductions the compiler vectorises (the newest position, skipped when no recent
// rows are protected; the least eligible position or score), then a block-wise scan for the first row holding that
// least value. The cases the reductions do not settle exactly -- no eligible row, an eligible NaN score (the scalar
// rule then keeps the first eligible row) -- take the scalar passes. Measured with a scratch harness (AMD EPYC,
// 2026-12-07, hot caches, 24 heads x 2041 rows a layer = batch 8 at 8K and a 25% budget, times x 30 layers): the
// scalar passes 1.6 ms (by score) / 3.2 ms (by age) a decode step; these 0.64 / 0.93 ms on one thread and
// 0.33 / 0.50 ms split over two.
inline int64_t ragged_evict_victim(const int64_t* ps, const float* sc, int64_t n, int64_t se, int64_t rc,
                                   bool by_age) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  // with no recent rows protected (rc <= 0: hi >= the newest position) every row passes p <= hi: no newest pass
  int64_t hi = std::numeric_limits<int64_t>::max();
  if (rc > 0) {
    int64_t newest = std::numeric_limits<int64_t>::min();
#pragma omp simd reduction(max : newest)
    for (int64_t i = 0; i < n; ++i) newest = std::max(newest, ps[i]);
    hi = newest - rc;  // positions are >= 0 and rc a window: no overflow, as in the scalar passes
  }
  if (by_age) {
    int64_t m = kMax;
#pragma omp simd reduction(min : m)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = ps[i];
      m = std::min(m, (p >= se && p <= hi) ? p : kMax);
    }
    if (m != kMax) {  // an eligible row: the first holding that position (any row at it is eligible)
      const int64_t i = first_match(n, [&](int64_t j) { return ps[j] == m; });
      if (i >= 0) return i;
    }
    return ragged_evict_victim_scalar(ps, sc, n, se, rc, by_age);
  }
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float m = kInf;
  int any = 0, nan = 0;
#pragma omp simd reduction(min : m) reduction(| : any, nan)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = ps[i];
    const float s = sc[i];
    const int e = (p >= se) & (p <= hi);
    m = std::min(m, e ? s : kInf);  // a NaN key never wins std::min(m, key)
    any |= e;
    nan |= e & (s != s);
  }
  if (any && !nan) {  // the first eligible row at the least score (every eligible row +inf: the first eligible one)
    const int64_t i = first_match(n, [&](int64_t j) { return (ps[j] >= se) & (ps[j] <= hi) & (sc[j] == m); });
    if (i >= 0) return i;
  }
  return ragged_evict_victim_scalar(ps, sc, n, se, rc, by_age);
}

// Evict every head down to its budget: while lengths[bh] > budget[bh], the victim is the live row with the lowest
// score (by_age: the oldest position) that is neither a sink (pos < sink_end) nor among the `recent` newest
// positions; if every live row is protected, the oldest non-sink row, else the oldest row. The head's last live row
// moves into the victim's slot (K, V, pos, score). Returns rows moved. Heads are independent (disjoint rows), so a
// large batch of them is split over OpenMP threads (the caller's thread count).
inline int64_t ragged_evict_rows(char* kp, char* vp, int64_t kb, int64_t vb, int64_t* ps, float* sc,
                                 const int64_t* off, int32_t* len, const int64_t* bud, const int64_t* se,
                                 const int64_t* rc, int64_t BH, bool by_age) {
  int64_t moved = 0, scan = 0;
  for (int64_t bh = 0; bh < BH; ++bh)
    if (len[bh] > bud[bh]) scan += len[bh];
#pragma omp parallel for schedule(static) reduction(+ : moved) if (BH > 1 && scan >= kRaggedParallelRows)
  for (int64_t bh = 0; bh < BH; ++bh) {
    while (len[bh] > bud[bh] && len[bh] > 0) {
      const int64_t o = off[bh], n = len[bh];
      const int64_t victim = ragged_evict_victim(ps + o, sc + o, n, se[bh], rc[bh], by_age);
      const int64_t dst = o + victim, src = o + n - 1;
      if (dst != src) {
        std::memcpy(kp + dst * kb, kp + src * kb, kb);
        std::memcpy(vp + dst * vb, vp + src * vb, vb);
        ps[dst] = ps[src];
        sc[dst] = sc[src];
        ++moved;
      }
      ps[src] = -1;
      len[bh] = static_cast<int32_t>(n - 1);
    }
  }
  return moved;
}

}  // namespace cpu
}  // namespace accel
