// HiP attention's hierarchical top-k branch search for one decode step, CPU (Lee et al., "HiP Attention: Sparse
// Sub-Quadratic Attention with Hierarchical Attention Pruning", ICLR 2025, arXiv 2406.09827). Torch-free.
//
// Per (sequence, KV head): starting from n branches [lo, hi) of the key range, every iteration splits each branch in
// two (at its midpoint; aligned branches at half the longest branch's length from their start), scores each child by
// the logits of its representative keys (rep_keys keys at its middle or its start, inside the child: the largest
// scale * q_g . k over them and the GQA group's query heads) and keeps the n best children (ties: the lower child), in position
// order, until no branch is longer than key_block. The branches of the first level no longer than coarse_at are
// written out as well (the level a later step refines from). The step's positions are then written ascending: the
// sinks (first + i below start), the kept branches' tokens, and the window [T - window, T). One call replaces the
// ~30 small torch operations per layer of the same search (accel.policies.hip's torch path, its tested twin).
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "accel/cpu/vec_math.h"

namespace accel {
namespace cpu {

#ifndef ACCEL_HIP_PF_ROWS
#define ACCEL_HIP_PF_ROWS 16
#endif
constexpr int kHipPfRows = ACCEL_HIP_PF_ROWS;  // representative rows requested ahead (with ACCEL_HIP_TOUCH=0)
// 1 (default): the representative rows of a level are read in tiles of about ACCEL_HIP_TOUCH_BYTES bytes, each tile
// first by a touch pass (one plain load per cache line of every row, so the tile's misses are in flight together)
// and then scored from L1; 0: each row requested kHipPfRows rows ahead by a software prefetch instead (see below)
#ifndef ACCEL_HIP_TOUCH
#define ACCEL_HIP_TOUCH 1
#endif
#ifndef ACCEL_HIP_TOUCH_BYTES
#define ACCEL_HIP_TOUCH_BYTES 16384
#endif
constexpr int64_t kHipTouchBytes = ACCEL_HIP_TOUCH_BYTES;  // a tile's rows, in bytes (kept well inside L1)

struct HipParams {
  const float* q = nullptr;  // [B, H, D] fp32
  const void* k = nullptr;   // keys (b, kh, t, d) at b*k_sb + kh*k_sh + t*k_st + d
  int64_t k_sb = 0, k_sh = 0, k_st = 0;
  int B = 0, H = 0, Hkv = 0, D = 0;
  int64_t T = 0;              // keys in the cache (representatives are clamped below it)
  const int64_t* lo = nullptr;  // [B, Hkv, n] the branches to refine
  const int64_t* hi = nullptr;
  int n = 0, key_block = 1, rep = 0;  // rep: 0 middle keys, 1 first keys
  int64_t rep_keys = 1;  // keys scored per child (HiP's code scores a child by its first key block, max over its keys)
  bool aligned = false;  // children: half the longest branch's length from the start (else the branch's midpoint)
  float scale = 1.f;
  int64_t coarse_at = 0;  // > 0: write the first level no longer than this to coarse_lo / coarse_hi
  int64_t* lo_out = nullptr;  // [B, Hkv, n]
  int64_t* hi_out = nullptr;
  int64_t* coarse_lo = nullptr;
  int64_t* coarse_hi = nullptr;
  // the step's positions
  const int64_t* first = nullptr;  // [B] first real position
  const int64_t* start = nullptr;  // [B] the searched span's start (the sinks lie below it)
  int sink = 0;
  int64_t window = 0;
  int32_t* idx = nullptr;  // [B, Hkv, width], -1 padded
  int64_t width = 0;
  int32_t* counts = nullptr;  // [B, Hkv]
  int64_t* reads = nullptr;   // [B, Hkv] key rows the search scored (a row scored at two levels counts twice), or nullptr
};

template <typename T>
inline void hip_search(const HipParams& p) {
  const int G = p.H / p.Hkv;
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.B; ++b)
    for (int kh = 0; kh < p.Hkv; ++kh) {
      const int64_t bh = static_cast<int64_t>(b) * p.Hkv + kh;
      const int n = p.n;
      std::vector<int64_t> lo(p.lo + bh * n, p.lo + bh * n + n), hi(p.hi + bh * n, p.hi + bh * n + n);
      std::vector<int64_t> clo(2 * n), chi(2 * n);
      std::vector<float> score(2 * n);
      std::vector<int> order(2 * n);
      std::vector<char> kept(2 * n);
      std::vector<int64_t> rep(2 * n), rlen(2 * n);
      const float* q = p.q + (static_cast<int64_t>(b) * p.H + static_cast<int64_t>(kh) * G) * p.D;
      const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh;
      bool coarse_done = p.coarse_at <= 0;
      int64_t rows_read = 0;
      for (;;) {
        int64_t longest = 0;
        for (int i = 0; i < n; ++i) longest = std::max(longest, hi[i] - lo[i]);
        if (!coarse_done && longest <= p.coarse_at) {
          std::copy(lo.begin(), lo.end(), p.coarse_lo + bh * n);
          std::copy(hi.begin(), hi.end(), p.coarse_hi + bh * n);
          coarse_done = true;
        }
        if (longest <= p.key_block || n == 0) break;
        const int64_t half = (longest + 1) / 2;  // aligned: children of half the level's length (shorter: full + rest)
        for (int i = 0; i < n; ++i) {
          const int64_t mid = p.aligned ? std::min(lo[i] + half, hi[i]) : (lo[i] + hi[i]) / 2;
          clo[2 * i] = lo[i]; chi[2 * i] = mid;
          clo[2 * i + 1] = mid; chi[2 * i + 1] = hi[i];
        }
        // the representatives' rows are scattered over the cache. Scored as they come, each row's misses wait on the
        // previous row's; a touch pass over a tile of them first puts all the tile's misses in flight at once. On the
        // AMD EPYC project machine (SmolLM2-135M, fp32, 8K context, one thread, 2026-12-07) the search with each row
        // requested 16 rows ahead by a software prefetch took 13.3 ms of a 33-34 ms decode step (~150 ns per row); the
        // prefetches did not overlap the misses there, as the sparse decode kernel's did not (touch_rows).
        const int64_t row_bytes = static_cast<int64_t>(p.D) * sizeof(T);
        const int64_t tile_rows = std::max<int64_t>(1, kHipTouchBytes / row_bytes);
        auto request = [&](int c) {
          for (int64_t j = 0; j < rlen[c]; ++j) {
            const char* row = reinterpret_cast<const char*>(kb + (rep[c] + j) * p.k_st);
            for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(row + o, 0, ACCEL_PF_LOCALITY);
          }
        };
        float touched = 0.f;
        auto touch = [&](int a, int e) {
          float t = 0.f;
          for (int c = a; c < e; ++c) {
            if (chi[c] <= clo[c]) continue;
            for (int64_t j = 0; j < rlen[c]; ++j)
              t += touch_row<T>(reinterpret_cast<const char*>(kb + (rep[c] + j) * p.k_st), row_bytes);
          }
          touched += t;
          asm volatile("" : : "g"(touched));  // the loads are the point: keep them
        };
        constexpr bool kTouch = ACCEL_HIP_TOUCH != 0;
        for (int c = 0; c < 2 * n; ++c) {  // keys [r, r + rep_keys) clipped to the child (and the cache)
          const int64_t r = p.rep == 1 ? clo[c] : std::max(clo[c], (clo[c] + chi[c] - p.rep_keys) / 2);
          rep[c] = std::min<int64_t>(std::max<int64_t>(r, 0), p.T - 1);
          rlen[c] = std::max<int64_t>(1, std::min({r + p.rep_keys, chi[c], p.T}) - rep[c]);
        }
        if (!kTouch)
          for (int c = 0; c < std::min(2 * n, kHipPfRows); ++c) request(c);
        int tile_end = 0;
        for (int c = 0; c < 2 * n; ++c) {
          if (kTouch && c == tile_end) {  // the next tile: children until about kHipTouchBytes of rows
            int64_t rows = 0;
            while (tile_end < 2 * n && (rows == 0 || rows + rlen[tile_end] <= tile_rows)) rows += rlen[tile_end++];
            touch(c, tile_end);
          }
          if (!kTouch && c + kHipPfRows < 2 * n) request(c + kHipPfRows);
          if (chi[c] <= clo[c]) {
            score[c] = ninf;
            continue;
          }
          rows_read += rlen[c];
          float best = ninf;
          for (int64_t j = 0; j < rlen[c]; ++j) {
            const T* kr = kb + (rep[c] + j) * p.k_st;
            for (int g = 0; g < G; ++g) {
              const float* qg = q + static_cast<int64_t>(g) * p.D;
              int d = 0;
              float dot = 0.f;
              if (p.D % 16 == 0) {
                v16f a{};
                for (; d < p.D; d += 16) a += load16(qg + d) * load16(kr + d);
                dot = hsum16(a);
              }
              for (; d < p.D; ++d) dot += qg[d] * Load<T>::get(kr, d);
              best = dot != dot ? std::numeric_limits<float>::infinity() : std::max(best, dot);  // NaN ranks first
            }
          }
          const float sc = best * p.scale;
          score[c] = sc != sc ? std::numeric_limits<float>::infinity() : sc;  // NaN after scaling ranks first (torch's too)
        }
        // the n best children under a strict total order (score descending, ties to the lower child), so the kept
        // set is unique and a selection finds the same set as a partial sort (the kept children are then taken in
        // position order); nth_element's selection took a fraction of partial_sort's heap passes, which cost
        // more than the scoring itself at 2n = 472 children (perf, 8K)
        std::iota(order.begin(), order.end(), 0);
        std::nth_element(order.begin(), order.begin() + n, order.end(), [&](int a, int c) {
          return score[a] > score[c] || (score[a] == score[c] && a < c);
        });
        std::fill(kept.begin(), kept.end(), 0);
        for (int i = 0; i < n; ++i) kept[order[i]] = 1;
        for (int c = 0, i = 0; c < 2 * n; ++c)  // position order
          if (kept[c]) {
            lo[i] = clo[c];
            hi[i] = chi[c];
            ++i;
          }
      }
      if (p.reads) p.reads[bh] = rows_read;
      std::copy(lo.begin(), lo.end(), p.lo_out + bh * n);
      std::copy(hi.begin(), hi.end(), p.hi_out + bh * n);
      // positions: sinks, kept branches, window (ascending: sinks < start <= branches < T - window)
      int32_t* out = p.idx + bh * p.width;
      int64_t m = 0;
      for (int i = 0; i < p.sink && m < p.width; ++i) {
        const int64_t t = p.first[b] + i;
        if (t < p.start[b]) out[m++] = static_cast<int32_t>(t);
      }
      for (int i = 0; i < n; ++i)
        for (int64_t t = lo[i]; t < hi[i] && m < p.width; ++t) out[m++] = static_cast<int32_t>(t);
      for (int64_t t = std::max<int64_t>(p.T - p.window, 0); t < p.T && m < p.width; ++t) out[m++] = static_cast<int32_t>(t);
      p.counts[bh] = static_cast<int32_t>(m);
      for (int64_t i = m; i < p.width; ++i) out[i] = -1;
    }
}

}  // namespace cpu
}  // namespace accel
