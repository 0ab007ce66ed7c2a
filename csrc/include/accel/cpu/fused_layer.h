// The parts of a Llama-family decoder layer around attention, for decode (M = a few token rows), fused into
// two calls so that a decode step pays no per-operation dispatch:
//   attn_in:  x = rmsnorm(h) ; q, k, v = x Wq^T (+bq), x Wk^T (+bk), x Wv^T (+bv) ;
//             optional per-head RMSNorm of q and k (Qwen3) ; rotary embedding of q and k
//   attn_out: h += a Wo^T (+bo) ; x = rmsnorm(h) ; h += (silu(x Wg^T) * (x Wu^T)) Wd^T
// The GEMVs are accel's small-M linear kernel (accel/cpu/linear.h); weights fp32, bf16 or fp16 rows, activations
// fp32. The arithmetic follows transformers' LlamaRMSNorm (fp32 mean of squares, rsqrt(var + eps), then the
// weight), apply_rotary_pos_emb (rotate_half convention, cos/sin as given) and the SiLU-gated MLP, so the result
// equals the module-by-module forward up to float rounding. Torch-free.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "accel/cpu/linear.h"

namespace accel {
namespace cpu {

enum class WType { kF32, kBF16, kF16 };

struct Mat {  // a weight [N, K] with row stride ldw, fp32, bf16 or fp16 rows
  const void* w = nullptr;
  int64_t ldw = 0;
  WType type = WType::kF32;
  int N = 0;
  const float* bias = nullptr;
  // bf16 rows only: the input rows may be rounded to bf16 for the product (small_m_linear's x_bf16: vdpbf16ps on
  // CPUs with AVX512_BF16)
  bool x_bf16 = false;
};

inline void gemv(const float* x, int M, int K, const Mat& m, float* y, int threads) {
  if (m.type == WType::kBF16)
    small_m_linear<uint16_t>(x, M, K, static_cast<const uint16_t*>(m.w), m.ldw, m.bias, y, m.N, threads, m.x_bf16);
  else if (m.type == WType::kF16)
    small_m_linear<f16>(x, M, K, static_cast<const f16*>(m.w), m.ldw, m.bias, y, m.N, threads);
  else
    small_m_linear<float>(x, M, K, static_cast<const float*>(m.w), m.ldw, m.bias, y, m.N, threads);
}

// y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) for R rows of width C
inline void rmsnorm_rows(const float* x, int R, int C, const float* w, float eps, float* y) {
  for (int r = 0; r < R; ++r) {
    const float* xr = x + static_cast<int64_t>(r) * C;
    float* yr = y + static_cast<int64_t>(r) * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
#pragma omp simd
    for (int c = 0; c < C; ++c) yr[c] = w[c] * (xr[c] * inv);
  }
}

// rotary embedding in place on `heads` heads of width D of row m: x = x*cos + rotate_half(x)*sin
inline void rope_row(float* x, int heads, int D, const float* cos, const float* sin) {
  const int half = D / 2;
  for (int h = 0; h < heads; ++h) {
    float* xh = x + static_cast<int64_t>(h) * D;
    for (int d = 0; d < half; ++d) {
      const float a = xh[d], b = xh[d + half];
      xh[d] = a * cos[d] - b * sin[d];
      xh[d + half] = b * cos[d + half] + a * sin[d + half];
    }
  }
}

struct AttnInParams {
  const float* h = nullptr;  // [M, C]
  int M = 0, C = 0, H = 0, Hkv = 0, D = 0;
  const float* ln = nullptr;
  float eps = 1e-5f;
  Mat wq, wk, wv;
  const float* q_norm = nullptr;  // [D] or nullptr
  const float* k_norm = nullptr;
  float qk_eps = 1e-6f;
  const float* cos = nullptr;  // [M or 1, D]
  const float* sin = nullptr;
  int64_t cs_stride = 0;  // 0: one row shared by every token
  float* q = nullptr;  // [M, H*D]
  float* k = nullptr;  // [M, Hkv*D]
  float* v = nullptr;
  int threads = 1;
};

inline void attn_in(const AttnInParams& p) {
  std::vector<float> x(static_cast<size_t>(p.M) * p.C);
  rmsnorm_rows(p.h, p.M, p.C, p.ln, p.eps, x.data());
  gemv(x.data(), p.M, p.C, p.wq, p.q, p.threads);
  gemv(x.data(), p.M, p.C, p.wk, p.k, p.threads);
  gemv(x.data(), p.M, p.C, p.wv, p.v, p.threads);
  if (p.q_norm) rmsnorm_rows(p.q, p.M * p.H, p.D, p.q_norm, p.qk_eps, p.q);
  if (p.k_norm) rmsnorm_rows(p.k, p.M * p.Hkv, p.D, p.k_norm, p.qk_eps, p.k);
  for (int m = 0; m < p.M; ++m) {
    const float* c = p.cos + m * p.cs_stride;
    const float* s = p.sin + m * p.cs_stride;
    rope_row(p.q + static_cast<int64_t>(m) * p.H * p.D, p.H, p.D, c, s);
    rope_row(p.k + static_cast<int64_t>(m) * p.Hkv * p.D, p.Hkv, p.D, c, s);
  }
}

struct AttnOutParams {
  float* h = nullptr;        // [M, C], updated in place
  const float* a = nullptr;  // [M, H*D] attention output
  int M = 0, C = 0, HD = 0, I = 0;
  Mat wo, wg, wu, wd;
  const float* ln = nullptr;
  float eps = 1e-5f;
  int threads = 1;
};

inline void attn_out_mlp(const AttnOutParams& p) {
  const int64_t MC = static_cast<int64_t>(p.M) * p.C;
  std::vector<float> t(MC), x(MC), g(static_cast<size_t>(p.M) * p.I), u(static_cast<size_t>(p.M) * p.I);
  gemv(p.a, p.M, p.HD, p.wo, t.data(), p.threads);
  for (int64_t i = 0; i < MC; ++i) p.h[i] += t[i];
  rmsnorm_rows(p.h, p.M, p.C, p.ln, p.eps, x.data());
  gemv(x.data(), p.M, p.C, p.wg, g.data(), p.threads);
  gemv(x.data(), p.M, p.C, p.wu, u.data(), p.threads);
  const int64_t MI = static_cast<int64_t>(p.M) * p.I;
  for (int64_t i = 0; i < MI; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  gemv(g.data(), p.M, p.I, p.wd, t.data(), p.threads);
  for (int64_t i = 0; i < MC; ++i) p.h[i] += t[i];
}

}  // namespace cpu
}  // namespace accel
