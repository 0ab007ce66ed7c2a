// Self-check of the decode-attention kernel (accel/cpu/decode_attention.h) against a double-precision reference,
// torch-free. tests/test_cpu_vectors.py builds it for the host's vectors and for AVX2 (-march=haswell), so both
// forms of the register-blocked tiles (16 lanes and 64-token tiles with AVX-512; 8 lanes and 16-token tiles on AVX2)
// are checked on whichever machine runs the tests. Covers fp32 and bf16 caches, head_dims 32-256, 1-8 query heads per
// KV head, token counts around the tile and block sizes, validity masks, sorted index lists, the logits output,
// ragged lengths and a token split over two threads. Prints the worst error and exits 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "accel/cpu/decode_attention.h"

using namespace accel::cpu;

namespace {

double g_worst = 0.0;
int g_fails = 0;

float uniform() { return std::rand() / static_cast<float>(RAND_MAX) * 2.f - 1.f; }

uint16_t to_bf16(float f) {  // truncation: the test compares against the same stored values
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

struct Case {
  int B = 1, Hkv = 2, G = 1, D = 64, T = 16;
  bool valid = false, indices = false, scores = false, ragged = false;
  int threads = 1;
};

template <typename T>
void check(const Case& c) {
  const int H = c.Hkv * c.G, BH = c.B * c.Hkv;
  std::vector<float> q(static_cast<size_t>(c.B) * H * c.D);
  for (auto& x : q) x = uniform();
  const size_t n = static_cast<size_t>(BH) * c.T * c.D;
  std::vector<T> K(n), V(n);
  for (size_t i = 0; i < n; ++i) {
    const float a = 2.f * uniform(), b = uniform();
    if constexpr (sizeof(T) == 2) K[i] = to_bf16(a), V[i] = to_bf16(b);
    else K[i] = a, V[i] = b;
  }
  std::vector<int32_t> len(BH, c.T), idx;
  if (c.ragged)
    for (int i = 0; i < BH; ++i) len[i] = std::max(1, c.T - (i * 37) % std::max(1, c.T));
  if (c.indices) {  // a sorted subset with runs of consecutive tokens (the kernel's prefetch treats runs apart)
    idx.assign(static_cast<size_t>(BH) * c.T, 0);
    for (int bh = 0; bh < BH; ++bh) {
      int m = 0;
      for (int t = 0; t < c.T && m < len[bh]; ++t)
        if ((t * 7 + bh) % 3 != 0 || t < 3) idx[static_cast<size_t>(bh) * c.T + m++] = t;
      len[bh] = m;
    }
  }
  std::vector<uint8_t> valid;
  if (c.valid) {
    valid.resize(static_cast<size_t>(c.B) * c.T);
    for (size_t i = 0; i < valid.size(); ++i) valid[i] = (i % 5) != 2 && (i % c.T) != 0;
  }
  std::vector<float> out(static_cast<size_t>(c.B) * H * c.D), lse(static_cast<size_t>(c.B) * H), sc;
  if (c.scores) sc.assign(static_cast<size_t>(c.B) * H * c.T, 12345.f);

  DecodeParams p;
  p.q = q.data(), p.k = K.data(), p.v = V.data();
  p.k_sb = p.v_sb = static_cast<int64_t>(c.Hkv) * c.T * c.D;
  p.k_sh = p.v_sh = static_cast<int64_t>(c.T) * c.D;
  p.k_st = p.v_st = c.D;
  p.lengths = len.data();
  if (c.indices) p.indices = idx.data(), p.idx_stride = c.T;
  if (c.valid) p.valid = valid.data(), p.valid_sb = c.T, p.valid_len = c.T;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  p.out = out.data(), p.lse = lse.data();
  if (c.scores) p.scores = sc.data(), p.scores_stride = c.T;
  p.B = c.B, p.H = H, p.Hkv = c.Hkv, p.D = c.D, p.num_threads = c.threads;
  decode_attention<T>(p);

  double err = 0.0, serr = 0.0;
  for (int b = 0; b < c.B; ++b)
    for (int kh = 0; kh < c.Hkv; ++kh) {
      const int bh = b * c.Hkv + kh, L = len[bh];
      for (int g = 0; g < c.G; ++g) {
        const int h = kh * c.G + g;
        const float* qh = &q[(static_cast<size_t>(b) * H + h) * c.D];
        std::vector<double> s(L);
        std::vector<char> ok(L);
        double M = -INFINITY;
        for (int i = 0; i < L; ++i) {
          const int t = c.indices ? idx[static_cast<size_t>(bh) * c.T + i] : i;
          const T* kr = &K[(static_cast<size_t>(bh) * c.T + t) * c.D];
          double d = 0.0;
          for (int x = 0; x < c.D; ++x) d += static_cast<double>(qh[x]) * Load<T>::get(kr, x);
          s[i] = d * p.scale;
          ok[i] = !c.valid || valid[static_cast<size_t>(b) * c.T + t];
          if (c.scores) {
            const float got = sc[(static_cast<size_t>(b) * H + h) * c.T + t];
            serr = std::max(serr, ok[i] ? std::fabs(got - s[i]) : (std::isinf(got) && got < 0 ? 0.0 : 1e9));
          }
          if (ok[i]) M = std::max(M, s[i]);
        }
        std::vector<double> o(c.D, 0.0);
        double Z = 0.0;
        for (int i = 0; i < L; ++i) {
          if (!ok[i]) continue;
          const int t = c.indices ? idx[static_cast<size_t>(bh) * c.T + i] : i;
          const double w = std::exp(s[i] - M);
          Z += w;
          const T* vr = &V[(static_cast<size_t>(bh) * c.T + t) * c.D];
          for (int x = 0; x < c.D; ++x) o[x] += w * Load<T>::get(vr, x);
        }
        for (int x = 0; x < c.D; ++x)
          err = std::max(err, std::fabs((Z > 0 ? o[x] / Z : 0.0) - out[(static_cast<size_t>(b) * H + h) * c.D + x]));
        if (Z > 0) err = std::max(err, std::fabs(M + std::log(Z) - lse[static_cast<size_t>(b) * H + h]));
      }
    }
  g_worst = std::max(g_worst, std::max(err, serr));
  if (err > 2e-4 || serr > 2e-4) {
    ++g_fails;
    std::printf("FAIL %s B=%d Hkv=%d G=%d D=%d T=%d valid=%d indices=%d scores=%d ragged=%d threads=%d: %g %g\n",
                sizeof(T) == 2 ? "bf16" : "fp32", c.B, c.Hkv, c.G, c.D, c.T, c.valid, c.indices, c.scores, c.ragged,
                c.threads, err, serr);
  }
}

}  // namespace

int main() {
  std::srand(3);
  for (int D : {64, 80, 96, 128, 256, 48, 32})
    for (int G : {1, 2, 3, 4, 5, 8})
      for (int T : {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 129, 200}) {
        const int v = (T * G + D) % 4;  // cycle through the feature combinations
        Case c{1, 2, G, D, T, (v & 1) != 0, (v & 2) != 0, true, T % 2 == 1, 1};
        check<float>(c);
        check<uint16_t>(c);
        check<float>(Case{1, 1, G, D, T});
        check<uint16_t>(Case{1, 1, G, D, T, true, true, true, false, 1});
      }
  check<float>(Case{1, 2, 3, 64, 3000, true, false, true, false, 2});  // split over the token axis
  check<uint16_t>(Case{1, 2, 4, 256, 3000, false, true, true, true, 2});
  check<uint16_t>(Case{2, 1, 4, 128, 1500, true, false, false, false, 2});
  std::printf("kTile %d lanes %d worst %g fails %d\n", kTile, kLanes, g_worst, g_fails);
  return g_fails ? 1 : 0;
}
