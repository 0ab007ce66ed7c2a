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
#include <vector>

#include "accel/cpu/vec_math.h"

namespace accel {
namespace cpu {

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
// faster after the change (accel bench, one run each, within a machine spread of up to ~15%).
inline void ragged_accumulate_rows(const float* lg, int64_t W, const float* ls, const int64_t* off, const int32_t* len,
                                   float* sc, int64_t B, int64_t H, int64_t Hkv) {
  const int64_t G = H / Hkv;
  const float inv = 1.f / static_cast<float>(G);
  const v16f iv = splat16(inv);
  std::vector<const float*> rows(static_cast<size_t>(G));
  std::vector<float> lse(static_cast<size_t>(G));
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int64_t b = bh / Hkv, kh = bh % Hkv;
    int64_t ng = 0;
    for (int64_t g = 0; g < G; ++g) {  // heads with nothing attended (lse not finite) add nothing
      const int64_t h = kh * G + g;
      if (!std::isfinite(ls[b * H + h])) continue;
      rows[ng] = lg + (b * H + h) * W;
      lse[ng++] = ls[b * H + h];
    }
    if (ng == 0) continue;
    float* s = sc + off[bh];
    const int64_t n = len[bh];
    int64_t t = 0;
#if defined(__AVX2__)
    for (; t + 16 <= n; t += 16) {
      v16f acc = load16(s + t);
      for (int64_t g = 0; g < ng; ++g) acc += fast_exp16(load16(rows[g] + t) - splat16(lse[g])) * iv;
      store16(s + t, acc);
    }
    for (; t < n; ++t)
      for (int64_t g = 0; g < ng; ++g) {
        const float x = rows[g][t] - lse[g];  // -inf gives exactly 0, as in the vector body
        s[t] += (x == -std::numeric_limits<float>::infinity() ? 0.f : fast_exp(x)) * inv;
      }
#else
    // baseline x86-64 (SSE2) builds: the 16-lane vectors are emulated there and ran 2x slower than libm's expf
    (void)iv;
    for (; t < n; ++t)
      for (int64_t g = 0; g < ng; ++g) s[t] += std::exp(rows[g][t] - lse[g]) * inv;
#endif
  }
}

// Evict every head down to its budget: while lengths[bh] > budget[bh], the victim is the live row with the lowest
// score (by_age: the oldest position) that is neither a sink (pos < sink_end) nor among the `recent` newest
// positions; if every live row is protected, the oldest non-sink row, else the oldest row. The head's last live row
// moves into the victim's slot (K, V, pos, score). Returns rows moved.
inline int64_t ragged_evict_rows(char* kp, char* vp, int64_t kb, int64_t vb, int64_t* ps, float* sc,
                                 const int64_t* off, int32_t* len, const int64_t* bud, const int64_t* se,
                                 const int64_t* rc, int64_t BH, bool by_age) {
  int64_t moved = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    while (len[bh] > bud[bh] && len[bh] > 0) {
      const int64_t o = off[bh], n = len[bh];
      int64_t newest = std::numeric_limits<int64_t>::min();
      for (int64_t i = 0; i < n; ++i) newest = std::max(newest, ps[o + i]);
      int64_t best = -1, fb = -1, oldest = -1;
      float best_s = std::numeric_limits<float>::infinity();
      int64_t best_p = std::numeric_limits<int64_t>::max(), fb_p = best_p, old_p = best_p;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = ps[o + i];
        if (p < old_p) { old_p = p; oldest = i; }
        if (p < se[bh]) continue;
        if (p < fb_p) { fb_p = p; fb = i; }
        if (p > newest - rc[bh]) continue;
        if (by_age) {
          if (p < best_p) { best_p = p; best = i; }
        } else if (sc[o + i] < best_s || best < 0) {
          best_s = sc[o + i];
          best = i;
        }
      }
      const int64_t victim = best >= 0 ? best : (fb >= 0 ? fb : oldest);
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
