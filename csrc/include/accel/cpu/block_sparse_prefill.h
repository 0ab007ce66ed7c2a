// Block-sparse causal prefill attention, CPU. Torch-free.
//
// Query block i of head h attends to the key blocks listed in blocks[h][i][0..counts[h][i]) (block
// size 64 tokens), with the causal mask applied inside the diagonal block. This covers per-head
// sink + sliding-window patterns (StreamingLLM, MoA's elastic spans, DuoAttention streaming heads)
// and vertical/slash block patterns. Per (b, h, query block): S = Q_blk K_blk^T as an outer-product
// loop vectorised over the 64 keys (K block transposed into a scratch tile), online softmax, then
// O += P V vectorised over D. GQA: query head h reads KV head h / (H / Hkv).
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

constexpr int kBS = 64;

struct BlockSparseParams {
  const float* q = nullptr;  // [B, H, Tq, D] contiguous
  const void* k = nullptr;   // (b, h, t, d) strided, d contiguous
  const void* v = nullptr;
  int64_t k_sb = 0, k_sh = 0, k_st = 0, v_sb = 0, v_sh = 0, v_st = 0;
  const int32_t* blocks = nullptr;  // [H, nqb, max_kb]
  const int32_t* counts = nullptr;  // [H, nqb]
  int max_kb = 0;
  int B = 0, H = 0, Hkv = 0, D = 0;
  int64_t Tq = 0, Tk = 0;  // queries are the last Tq positions of the Tk keys
  float scale = 1.f;
  float* out = nullptr;  // [B, H, Tq, D]
};

// ---- AVX2 tiles (16 ymm registers) ----
// The 16-lane tiles below were sized for AVX-512's 32 registers: without AVX-512 a v16f is a pair of ymm, and 4 rows
// x 64 keys of accumulators (32 ymm) spill on every FMA. There the score and value tiles are RB rows x 16 lanes of
// 8-lane accumulators (2*RB registers) plus two loaded K^T / V vectors and a broadcast: RB = 6 (15 registers; 12
// independent FMA chains cover the FMA latency), then 2 and 1 for the last rows. Measured on the AVX2 project machine
// (8K tokens, head_dim 64, sink 64 + window 960, one thread): 33 GFLOP/s with the 16-lane tiles, 39 with RB = 4 and
// 55 with RB = 6, against ~59 for torch's dense flash kernel.
template <int RB>
static inline void bs_scores8(const float* q, int D, const float* kt, int r0, float (*s)[kBS], float scale) {
  for (int cp = 0; cp < kBS; cp += 16) {
    v8f a[RB][2];
    for (int x = 0; x < RB; ++x) a[x][0] = a[x][1] = v8f{};
    for (int d = 0; d < D; ++d) {
      const float* kr = kt + d * kBS + cp;
      const v8f k0 = load8(kr), k1 = load8(kr + 8);
      for (int x = 0; x < RB; ++x) {
        const v8f qd = splat8(q[static_cast<int64_t>(r0 + x) * D + d]);
        a[x][0] += qd * k0;
        a[x][1] += qd * k1;
      }
    }
    const v8f sc = splat8(scale);
    for (int x = 0; x < RB; ++x) {
      const v8f s0 = a[x][0] * sc, s1 = a[x][1] * sc;
      std::memcpy(s[r0 + x] + cp, &s0, sizeof(v8f));
      std::memcpy(s[r0 + x] + cp + 8, &s1, sizeof(v8f));
    }
  }
}

template <typename T, int RB>
static inline void bs_values8(float* acc, int D, const T* vb, int64_t v_st, int64_t j0, int nc, const float (*s)[kBS],
                              const float* alpha, int r0) {
  for (int dp = 0; dp < D; dp += 16) {
    v8f a[RB][2];
    for (int x = 0; x < RB; ++x) {
      const float* ar = acc + static_cast<int64_t>(r0 + x) * D + dp;
      const v8f al = splat8(alpha[r0 + x]);
      a[x][0] = load8(ar) * al;
      a[x][1] = load8(ar + 8) * al;
    }
    for (int c = 0; c < nc; ++c) {
      const T* vr = vb + (j0 + c) * v_st + dp;
      const v8f v0 = load8(vr), v1 = load8(vr + 8);
      for (int x = 0; x < RB; ++x) {
        const v8f pv = splat8(s[r0 + x][c]);
        a[x][0] += pv * v0;
        a[x][1] += pv * v1;
      }
    }
    for (int x = 0; x < RB; ++x) {
      float* ar = acc + static_cast<int64_t>(r0 + x) * D + dp;
      std::memcpy(ar, &a[x][0], sizeof(v8f));
      std::memcpy(ar + 8, &a[x][1], sizeof(v8f));
    }
  }
}

// kt_all: K transposed per 64-token block, [B, Hkv, n_kblocks, D, 64] fp32 (zero-padded tail)
template <typename T, int DC>
static void bs_block(const BlockSparseParams& p, const float* kt_all, int b, int h, int64_t qb) {
  const int D = DC > 0 ? DC : p.D;
  // rows sharing each loaded K^T / V vector, bounded by the 32 vector registers of AVX-512
  constexpr int RB = DC == 0 ? 1 : (DC <= 64 ? 4 : (DC <= 128 ? 2 : 1));
#ifndef ACCEL_V16F_NATIVE
  constexpr bool kTiles8 = DC > 0 && DC % 16 == 0;  // the AVX2 tiles (bs_scores8 / bs_values8)
#else
  constexpr bool kTiles8 = false;
#endif
  const int G = p.H / p.Hkv, kh = h / G;
  const int64_t off = p.Tk - p.Tq;  // absolute position of query row 0
  const int64_t i0 = qb * kBS, i1 = std::min(p.Tq, i0 + kBS);
  const int nr = static_cast<int>(i1 - i0);
  const float* q = p.q + ((static_cast<int64_t>(b) * p.H + h) * p.Tq + i0) * D;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kh * p.v_sh;
  float* o = p.out + ((static_cast<int64_t>(b) * p.H + h) * p.Tq + i0) * D;
  const float ninf = -std::numeric_limits<float>::infinity();

  const int64_t nkb = (p.Tk + kBS - 1) / kBS;
  const float* kt_head = kt_all + (static_cast<int64_t>(b) * p.Hkv + kh) * nkb * D * kBS;
  alignas(64) float s[kBS][kBS];
  std::vector<float> acc(static_cast<size_t>(nr) * D, 0.f);
  float m[kBS], l[kBS];
  for (int r = 0; r < nr; ++r) { m[r] = ninf; l[r] = 0.f; }

  const int64_t nqb = (p.Tq + kBS - 1) / kBS;
  const int32_t* list = p.blocks + (static_cast<int64_t>(h) * nqb + qb) * p.max_kb;
  const int cnt = p.counts[static_cast<int64_t>(h) * nqb + qb];
  for (int bi = 0; bi < cnt; ++bi) {
    const int64_t j0 = static_cast<int64_t>(list[bi]) * kBS;
    if (j0 >= p.Tk || j0 > off + i1 - 1) continue;  // beyond the keys or entirely in the future
    const int nc = static_cast<int>(std::min<int64_t>(kBS, p.Tk - j0));
    const float* kt = kt_head + (j0 / kBS) * D * kBS;
    // only the diagonal / tail blocks need the element mask
    const bool need_mask = nc < kBS || j0 + kBS - 1 > off + i0;
    // S = Q K^T, vectorised over the 64 keys; RB query rows share each loaded K^T vector
    if constexpr (kTiles8) {
      int r = 0;
      for (; r + 6 <= nr; r += 6) bs_scores8<6>(q, D, kt, r, s, p.scale);
      for (; r + 2 <= nr; r += 2) bs_scores8<2>(q, D, kt, r, s, p.scale);
      for (; r < nr; ++r) bs_scores8<1>(q, D, kt, r, s, p.scale);
    } else {
      int r = 0;
      for (; r + RB <= nr; r += RB) {
        v16f a[RB][4];
        for (int x = 0; x < RB; ++x)
          for (int c = 0; c < 4; ++c) a[x][c] = v16f{};
        for (int d = 0; d < D; ++d) {
          const float* kr = kt + d * kBS;
          const v16f k0 = load16(kr), k1 = load16(kr + 16), k2 = load16(kr + 32), k3 = load16(kr + 48);
          for (int x = 0; x < RB; ++x) {
            const v16f qd = splat16(q[static_cast<int64_t>(r + x) * D + d]);
            a[x][0] += qd * k0;
            a[x][1] += qd * k1;
            a[x][2] += qd * k2;
            a[x][3] += qd * k3;
          }
        }
        for (int x = 0; x < RB; ++x)
          for (int c = 0; c < 4; ++c) store16(s[r + x] + 16 * c, a[x][c] * p.scale);
      }
      for (; r < nr; ++r) {
        v16f a0{}, a1{}, a2{}, a3{};
        const float* qr = q + static_cast<int64_t>(r) * D;
        for (int d = 0; d < D; ++d) {
          const v16f qd = splat16(qr[d]);
          const float* kr = kt + d * kBS;
          a0 += qd * load16(kr);
          a1 += qd * load16(kr + 16);
          a2 += qd * load16(kr + 32);
          a3 += qd * load16(kr + 48);
        }
        store16(s[r], a0 * p.scale);
        store16(s[r] + 16, a1 * p.scale);
        store16(s[r] + 32, a2 * p.scale);
        store16(s[r] + 48, a3 * p.scale);
      }
    }
    if (need_mask)
      for (int rr = 0; rr < nr; ++rr) {
        const int64_t qpos = off + i0 + rr;
        for (int c = 0; c < kBS; ++c)
          if (c >= nc || j0 + c > qpos) s[rr][c] = ninf;
      }
    // online softmax per row (probabilities overwrite s; alpha rescales the row's accumulator)
    float alpha_r[kBS];
    for (int r = 0; r < nr; ++r) {
      const float mx = hmax16(vmax16(vmax16(load16(s[r]), load16(s[r] + 16)), vmax16(load16(s[r] + 32), load16(s[r] + 48))));
      if (mx == ninf) {
        alpha_r[r] = 1.f;
        for (int c = 0; c < kBS; ++c) s[r][c] = 0.f;
        continue;
      }
      const float newm = std::max(m[r], mx);
      const float alpha = m[r] == ninf ? 0.f : fast_exp(m[r] - newm);
      const v16f nm = splat16(newm);
      v16f sv = v16f{};
      for (int c = 0; c < kBS; c += 16) {
        const v16f e = fast_exp16(load16(s[r] + c) - nm);
        store16(s[r] + c, e);
        sv += e;
      }
      const float sum = hsum16(sv);
      l[r] = l[r] * alpha + sum;
      m[r] = newm;
      alpha_r[r] = alpha;
    }
    // O = alpha * O + P V; RB rows share each loaded V row
    if constexpr (kTiles8) {
      int r = 0;
      for (; r + 6 <= nr; r += 6) bs_values8<T, 6>(acc.data(), D, vb, p.v_st, j0, nc, s, alpha_r, r);
      for (; r + 2 <= nr; r += 2) bs_values8<T, 2>(acc.data(), D, vb, p.v_st, j0, nc, s, alpha_r, r);
      for (; r < nr; ++r) bs_values8<T, 1>(acc.data(), D, vb, p.v_st, j0, nc, s, alpha_r, r);
    } else if constexpr (DC > 0 && DC % 16 == 0) {
      constexpr int NV = DC / 16;
      int r = 0;
      for (; r + RB <= nr; r += RB) {
        v16f a[RB][NV];
        for (int x = 0; x < RB; ++x) {
          const float* ar = acc.data() + static_cast<int64_t>(r + x) * D;
          const v16f al = splat16(alpha_r[r + x]);
          for (int y = 0; y < NV; ++y) a[x][y] = load16(ar + 16 * y) * al;
        }
        for (int c = 0; c < nc; ++c) {
          const T* vr = vb + (j0 + c) * p.v_st;
          v16f vv[NV];
          for (int y = 0; y < NV; ++y) vv[y] = load16(vr + 16 * y);
          for (int x = 0; x < RB; ++x) {
            const v16f pv = splat16(s[r + x][c]);
            for (int y = 0; y < NV; ++y) a[x][y] += pv * vv[y];
          }
        }
        for (int x = 0; x < RB; ++x) {
          float* ar = acc.data() + static_cast<int64_t>(r + x) * D;
          for (int y = 0; y < NV; ++y) store16(ar + 16 * y, a[x][y]);
        }
      }
      for (; r < nr; ++r) {
        float* ar = acc.data() + static_cast<int64_t>(r) * D;
        v16f a[NV];
        const v16f al = splat16(alpha_r[r]);
        for (int y = 0; y < NV; ++y) a[y] = load16(ar + 16 * y) * al;
        for (int c = 0; c < nc; ++c) {
          const T* vr = vb + (j0 + c) * p.v_st;
          const v16f pv = splat16(s[r][c]);
          for (int y = 0; y < NV; ++y) a[y] += pv * load16(vr + 16 * y);
        }
        for (int y = 0; y < NV; ++y) store16(ar + 16 * y, a[y]);
      }
    } else {
      for (int r = 0; r < nr; ++r) {
        float* ar = acc.data() + static_cast<int64_t>(r) * D;
        for (int d = 0; d < D; ++d) ar[d] *= alpha_r[r];
        for (int c = 0; c < nc; ++c) {
          const float pc = s[r][c];
          if (pc == 0.f) continue;
          const T* vr = vb + (j0 + c) * p.v_st;
          for (int d = 0; d < D; ++d) ar[d] += pc * Load<T>::get(vr, d);
        }
      }
    }
  }
  for (int r = 0; r < nr; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int d = 0; d < D; ++d) o[static_cast<int64_t>(r) * D + d] = acc[static_cast<int64_t>(r) * D + d] * inv;
  }
}

template <typename T, int DC>
static void block_sparse_prefill_impl(const BlockSparseParams& p) {
  const int D = DC > 0 ? DC : p.D;
  const int64_t nqb = (p.Tq + kBS - 1) / kBS;
  const int64_t nkb = (p.Tk + kBS - 1) / kBS;
  // transpose every K block once (shared by the G query heads of a KV head and all query blocks)
  std::vector<float> kt(static_cast<size_t>(p.B) * p.Hkv * nkb * D * kBS);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.B; ++b)
    for (int kh = 0; kh < p.Hkv; ++kh) {
      const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh;
      float* dst = kt.data() + (static_cast<int64_t>(b) * p.Hkv + kh) * nkb * D * kBS;
      for (int64_t j = 0; j < nkb; ++j)
        for (int c = 0; c < kBS; ++c) {
          const int64_t t = j * kBS + c;
          float* col = dst + j * D * kBS + c;
          if (t < p.Tk) {
            const T* kr = kb + t * p.k_st;
            for (int d = 0; d < D; ++d) col[d * kBS] = Load<T>::get(kr, d);
          } else {
            for (int d = 0; d < D; ++d) col[d * kBS] = 0.f;
          }
        }
    }
  const int64_t items = static_cast<int64_t>(p.B) * p.H * nqb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int b = static_cast<int>(it / (p.H * nqb));
    const int h = static_cast<int>((it / nqb) % p.H);
    bs_block<T, DC>(p, kt.data(), b, h, it % nqb);
  }
}

template <typename T>
inline void block_sparse_prefill(const BlockSparseParams& p) {
  switch (p.D) {
    case 64: block_sparse_prefill_impl<T, 64>(p); break;
    case 128: block_sparse_prefill_impl<T, 128>(p); break;
    case 256: block_sparse_prefill_impl<T, 256>(p); break;
    default: block_sparse_prefill_impl<T, 0>(p); break;
  }
}

}  // namespace cpu
}  // namespace accel
