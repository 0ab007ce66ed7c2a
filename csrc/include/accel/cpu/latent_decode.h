// Latent (MLA / TPLA) decode attention on the CPU: one query per sequence for H heads over a cache of
// shared latent rows. Row t of sequence b holds [c_t (Dl values) | k^R_t (Dr values)]; every head uses
// the whole row as its key and the first Dl values (the latent) as its value, so this is MQA with a
// (Dl + Dr)-wide key and a Dl-wide value (DeepSeek-V2's absorbed decode; one TPLA shard when the row
// holds the shard's slice of the latent). Torch-free; the launcher checks every argument.
//
// Work split: (sequence, block of heads) pairs over OpenMP threads. Rows are visited in tiles of kLTile;
// each tile's rows are read once for all heads of the block (logits, online softmax, value accumulation),
// so the cache is streamed once per head block. Optional index lists (sparse decode over selected rows)
// and a per-position validity mask (padding). All arithmetic in fp32; bf16 rows are widened on load.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <omp.h>

#include "accel/cpu/vec_math.h"

namespace accel {
namespace cpu {

struct LatentParams {
  const float* q = nullptr;       // [B, H, Dl + Dr] contiguous
  const void* kv = nullptr;       // rows of Dl + Dr values: element (b, t, d) at b*kv_sb + t*kv_st + d
  int64_t kv_sb = 0, kv_st = 0;   // strides in elements
  const int32_t* lengths = nullptr;  // [B]: rows attended (dense) or index-list entries (sparse)
  const int32_t* indices = nullptr;  // optional [B, idx_stride]: row positions
  int64_t idx_stride = 0;
  const uint8_t* valid = nullptr;    // optional [B, valid_stride]: 0 = skip that position
  int64_t valid_stride = 0;
  int64_t B = 0, H = 0, Dl = 0, Dr = 0;
  float scale = 1.f;
  float* out = nullptr;  // [B, H, Dl]
  float* lse = nullptr;  // [B, H] (may be null)
  int num_threads = 0;
};

constexpr int kLTile = 32;
constexpr int kLHeads = 16;  // heads per work item

template <typename T>
inline const float* latent_row(const LatentParams& p, int64_t b, int64_t t, float* buf) {
  const T* r = static_cast<const T*>(p.kv) + b * p.kv_sb + t * p.kv_st;
  const int64_t Dk = p.Dl + p.Dr;
  if constexpr (sizeof(T) == sizeof(float)) {
    (void)buf;
    (void)Dk;
    return reinterpret_cast<const float*>(r);
  } else {
    for (int64_t d = 0; d < Dk; ++d) buf[d] = Load<T>::get(r, d);  // bf16 or fp16, widened
    return buf;
  }
}

// Fast path (Dl and Dr multiples of 16): logits of 4 heads x 4 rows per pass with 16 vector accumulators
// (8 loads per 16 FMAs), values accumulated in registers over the tile's rows for 4 heads x 64 channels.
inline void logits_v16(const float* q, int64_t Dk, int nh, const float* const* rows, int kept, float scale,
                       float (*s)[kLTile]) {
  int h = 0;
  for (; h + 4 <= nh; h += 4) {
    const float* qh = q + h * Dk;
    int j = 0;
    for (; j + 4 <= kept; j += 4) {
      v16f acc[16] = {};  // acc[4 * y + x]: head h + y, row j + x
      for (int64_t d = 0; d < Dk; d += 16) {
        v16f r[4], qq[4];
        for (int x = 0; x < 4; ++x) r[x] = load16(rows[j + x] + d);
        for (int y = 0; y < 4; ++y) qq[y] = load16(qh + y * Dk + d);
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 4; ++x) acc[4 * y + x] += qq[y] * r[x];
      }
      const v16f sums = reduce16x16(acc) * scale;
      for (int y = 0; y < 4; ++y)
        for (int x = 0; x < 4; ++x) s[h + y][j + x] = sums[4 * y + x];
    }
    for (; j < kept; ++j) {
      v16f acc[4] = {};
      for (int64_t d = 0; d < Dk; d += 16) {
        const v16f r = load16(rows[j] + d);
        for (int y = 0; y < 4; ++y) acc[y] += load16(qh + y * Dk + d) * r;
      }
      for (int y = 0; y < 4; ++y) s[h + y][j] = hsum16(acc[y]) * scale;
    }
  }
  for (; h < nh; ++h) {
    for (int j = 0; j < kept; ++j) {
      v16f acc = {};
      for (int64_t d = 0; d < Dk; d += 16) acc += load16(q + h * Dk + d) * load16(rows[j] + d);
      s[h][j] = hsum16(acc) * scale;
    }
  }
}

inline void values_v16(float* acc, int64_t Dl, int nh, const float* const* rows, int kept, const float (*s)[kLTile]) {
  int h = 0;
  for (; h + 4 <= nh; h += 4) {
    int64_t d = 0;
    for (; d + 64 <= Dl; d += 64) {
      v16f a[4][4];
      for (int y = 0; y < 4; ++y)
        for (int c = 0; c < 4; ++c) a[y][c] = load16(acc + (h + y) * Dl + d + 16 * c);
      for (int j = 0; j < kept; ++j) {
        v16f r[4];
        for (int c = 0; c < 4; ++c) r[c] = load16(rows[j] + d + 16 * c);
        for (int y = 0; y < 4; ++y) {
          const v16f p = splat16(s[h + y][j]);
          for (int c = 0; c < 4; ++c) a[y][c] += p * r[c];
        }
      }
      for (int y = 0; y < 4; ++y)
        for (int c = 0; c < 4; ++c) store16(acc + (h + y) * Dl + d + 16 * c, a[y][c]);
    }
    for (; d < Dl; d += 16) {
      v16f a[4];
      for (int y = 0; y < 4; ++y) a[y] = load16(acc + (h + y) * Dl + d);
      for (int j = 0; j < kept; ++j) {
        const v16f r = load16(rows[j] + d);
        for (int y = 0; y < 4; ++y) a[y] += splat16(s[h + y][j]) * r;
      }
      for (int y = 0; y < 4; ++y) store16(acc + (h + y) * Dl + d, a[y]);
    }
  }
  for (; h < nh; ++h)
    for (int64_t d = 0; d < Dl; d += 16) {
      v16f a = load16(acc + h * Dl + d);
      for (int j = 0; j < kept; ++j) a += splat16(s[h][j]) * load16(rows[j] + d);
      store16(acc + h * Dl + d, a);
    }
}

template <typename T>
void latent_decode_block(const LatentParams& p, int64_t b, int64_t h0, int64_t nh, float* acc, float* rowbuf) {
  const int64_t Dl = p.Dl, Dk = p.Dl + p.Dr;
  const float* q = p.q + (b * p.H + h0) * Dk;
  float m[kLHeads], l[kLHeads];
  float s[kLHeads][kLTile];
  for (int h = 0; h < nh; ++h) {
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  std::fill(acc, acc + nh * Dl, 0.f);
  const int64_t n = p.lengths[b];
  const float* rows[kLTile];
  for (int64_t i0 = 0; i0 < n; i0 += kLTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kLTile, n - i0));
    int kept = 0;
    for (int j = 0; j < nt; ++j) {
      const int64_t t = p.indices ? p.indices[b * p.idx_stride + i0 + j] : i0 + j;
      if (p.valid && !p.valid[b * p.valid_stride + t]) continue;
      rows[kept] = latent_row<T>(p, b, t, rowbuf + kept * Dk);
      ++kept;
    }
    if (kept == 0) continue;
    const bool fast = (Dl % 16 == 0) && (p.Dr % 16 == 0);
    int h = 0;
    if (fast) {
      logits_v16(q, Dk, static_cast<int>(nh), rows, kept, p.scale, s);
      h = static_cast<int>(nh);
    }
    // generic logits: 4 heads per pass so each row value is loaded once per 4 FMAs
    for (; h + 4 <= nh; h += 4) {
      const float *q0 = q + h * Dk, *q1 = q0 + Dk, *q2 = q1 + Dk, *q3 = q2 + Dk;
      for (int j = 0; j < kept; ++j) {
        const float* r = rows[j];
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t d = 0; d < Dk; ++d) {
          const float x = r[d];
          a0 += q0[d] * x;
          a1 += q1[d] * x;
          a2 += q2[d] * x;
          a3 += q3[d] * x;
        }
        s[h][j] = a0 * p.scale;
        s[h + 1][j] = a1 * p.scale;
        s[h + 2][j] = a2 * p.scale;
        s[h + 3][j] = a3 * p.scale;
      }
    }
    for (; h < nh; ++h) {
      const float* qh = q + h * Dk;
      for (int j = 0; j < kept; ++j) {
        const float* r = rows[j];
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t d = 0; d < Dk; ++d) a += qh[d] * r[d];
        s[h][j] = a * p.scale;
      }
    }
    if (fast && kept == kLTile) {  // online softmax, 16 lanes at a time
      for (h = 0; h < nh; ++h) {
        v16f a = load16(s[h]), b = load16(s[h] + 16);
        const float mx = std::max(m[h], hmax16(vmax16(a, b)));
        const float corr = fast_exp(m[h] - mx);
        a = fast_exp16(a - mx);
        b = fast_exp16(b - mx);
        store16(s[h], a);
        store16(s[h] + 16, b);
        if (corr != 1.f) {
          float* ah = acc + h * Dl;
          for (int64_t d = 0; d < Dl; d += 16) store16(ah + d, load16(ah + d) * corr);
        }
        l[h] = l[h] * corr + hsum16(a + b);
        m[h] = mx;
      }
      values_v16(acc, Dl, static_cast<int>(nh), rows, kept, s);
      continue;
    }
    // online softmax per head
    for (h = 0; h < nh; ++h) {
      float mx = m[h];
      for (int j = 0; j < kept; ++j) mx = s[h][j] > mx ? s[h][j] : mx;
      const float corr = fast_exp(m[h] - mx);
      float sum = 0.f;
      for (int j = 0; j < kept; ++j) {
        const float e = fast_exp(s[h][j] - mx);
        s[h][j] = e;
        sum += e;
      }
      if (corr != 1.f) {
        float* a = acc + h * Dl;
#pragma omp simd
        for (int64_t d = 0; d < Dl; ++d) a[d] *= corr;
      }
      l[h] = l[h] * corr + sum;
      m[h] = mx;
    }
    if (fast) {
      values_v16(acc, Dl, static_cast<int>(nh), rows, kept, s);
      continue;
    }
    // generic values: the latent part of each row, 4 heads per pass
    for (int j = 0; j < kept; ++j) {
      const float* r = rows[j];
      h = 0;
      for (; h + 4 <= nh; h += 4) {
        float *a0 = acc + h * Dl, *a1 = a0 + Dl, *a2 = a1 + Dl, *a3 = a2 + Dl;
        const float p0 = s[h][j], p1 = s[h + 1][j], p2 = s[h + 2][j], p3 = s[h + 3][j];
#pragma omp simd
        for (int64_t d = 0; d < Dl; ++d) {
          const float x = r[d];
          a0[d] += p0 * x;
          a1[d] += p1 * x;
          a2[d] += p2 * x;
          a3[d] += p3 * x;
        }
      }
      for (; h < nh; ++h) {
        float* a = acc + h * Dl;
        const float ph = s[h][j];
#pragma omp simd
        for (int64_t d = 0; d < Dl; ++d) a[d] += ph * r[d];
      }
    }
  }
  for (int h = 0; h < nh; ++h) {
    float* o = p.out + (b * p.H + h0 + h) * Dl;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    const float* a = acc + h * Dl;
#pragma omp simd
    for (int64_t d = 0; d < Dl; ++d) o[d] = a[d] * inv;
    if (p.lse) p.lse[b * p.H + h0 + h] = l[h] > 0.f ? m[h] + std::log(l[h]) : -std::numeric_limits<float>::infinity();
  }
}

template <typename T>
void latent_decode(const LatentParams& p) {
  const int64_t hb = (p.H + kLHeads - 1) / kLHeads;
  const int64_t items = p.B * hb;
  const int64_t Dk = p.Dl + p.Dr;
  const int threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
  {
    std::vector<float> acc(static_cast<size_t>(kLHeads * p.Dl));
    std::vector<float> rowbuf(sizeof(T) == sizeof(float) ? 1 : static_cast<size_t>(kLTile * Dk));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / hb, h0 = (it % hb) * kLHeads;
      latent_decode_block<T>(p, b, h0, std::min<int64_t>(kLHeads, p.H - h0), acc.data(), rowbuf.data());
    }
  }
}

}  // namespace cpu
}  // namespace accel
