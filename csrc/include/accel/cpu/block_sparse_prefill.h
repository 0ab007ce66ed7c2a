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

template <typename T, int DC>
static void bs_block(const BlockSparseParams& p, int b, int h, int64_t qb) {
  const int D = DC > 0 ? DC : p.D;
  const int G = p.H / p.Hkv, kh = h / G;
  const int64_t off = p.Tk - p.Tq;  // absolute position of query row 0
  const int64_t i0 = qb * kBS, i1 = std::min(p.Tq, i0 + kBS);
  const int nr = static_cast<int>(i1 - i0);
  const float* q = p.q + ((static_cast<int64_t>(b) * p.H + h) * p.Tq + i0) * D;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kh * p.v_sh;
  float* o = p.out + ((static_cast<int64_t>(b) * p.H + h) * p.Tq + i0) * D;
  const float ninf = -std::numeric_limits<float>::infinity();

  alignas(64) float kt[256 * kBS];  // K block transposed [D][64] (D <= 256)
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
    for (int c = 0; c < kBS; ++c)
      for (int d = 0; d < D; ++d) kt[d * kBS + c] = c < nc ? Load<T>::get(kb + (j0 + c) * p.k_st, d) : 0.f;
    // S = Q K^T, vectorised over the 64 keys
    for (int r = 0; r < nr; ++r) {
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
      const int64_t qpos = off + i0 + r;
      for (int c = 0; c < kBS; ++c)
        if (c >= nc || j0 + c > qpos) s[r][c] = ninf;
    }
    // online softmax + O += P V
    for (int r = 0; r < nr; ++r) {
      float mx = ninf;
      for (int c = 0; c < kBS; ++c) mx = std::max(mx, s[r][c]);
      if (mx == ninf) continue;
      const float newm = std::max(m[r], mx);
      const float alpha = m[r] == ninf ? 0.f : fast_exp(m[r] - newm);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int c = 0; c < kBS; ++c) {
        const float e = s[r][c] == ninf ? 0.f : fast_exp(s[r][c] - newm);
        s[r][c] = e;
        sum += e;
      }
      l[r] = l[r] * alpha + sum;
      m[r] = newm;
      float* ar = acc.data() + static_cast<int64_t>(r) * D;
      if constexpr (DC > 0 && DC % 16 == 0) {
        constexpr int NV = DC / 16;
        v16f a[NV];
        for (int x = 0; x < NV; ++x) a[x] = load16(ar + 16 * x) * alpha;
        for (int c = 0; c < nc; ++c) {
          const float pc = s[r][c];
          if (pc == 0.f) continue;
          const T* vr = vb + (j0 + c) * p.v_st;
          const v16f pv = splat16(pc);
          for (int x = 0; x < NV; ++x) a[x] += pv * load16(vr + 16 * x);
        }
        for (int x = 0; x < NV; ++x) store16(ar + 16 * x, a[x]);
      } else {
        for (int d = 0; d < D; ++d) ar[d] *= alpha;
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
  const int64_t nqb = (p.Tq + kBS - 1) / kBS;
  const int64_t items = static_cast<int64_t>(p.B) * p.H * nqb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int b = static_cast<int>(it / (p.H * nqb));
    const int h = static_cast<int>((it / nqb) % p.H);
    bs_block<T, DC>(p, b, h, it % nqb);
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
