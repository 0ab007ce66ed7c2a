// Self-check of the 16-lane vector layer (vec_math.h) and the small-M linear kernel, torch-free, built by
// tests/test_cpu_vectors.py twice: with the machine's native vectors and with -DACCEL_VEC_PAIR (v16f as two
// 8-lane halves, the form used without AVX-512). Prints the worst errors against scalar references.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>

#include "accel/cpu/linear.h"
#include "accel/cpu/vec_math.h"

using namespace accel::cpu;

int main() {
  std::srand(1);
  auto rnd = [] { return std::rand() / float(RAND_MAX) * 2.f - 1.f; };
  float a[16], b[16], out[16];
  double err_exp = 0, err_sum = 0, err_max = 0, err_ops = 0;
  for (int it = 0; it < 200; ++it) {
    for (int i = 0; i < 16; ++i) a[i] = rnd() * 30.f - 30.f, b[i] = rnd();
    a[it % 16] = -INFINITY;
    store16(out, fast_exp16(load16(a)));
    for (int i = 0; i < 16; ++i) err_exp = std::fmax(err_exp, std::fabs(out[i] - std::exp(a[i])) / (std::exp(a[i]) + 1e-30));
    a[it % 16] = rnd();
    double s = 0, m = -INFINITY;
    for (int i = 0; i < 16; ++i) s += b[i], m = std::fmax(m, b[i]);
    err_sum = std::fmax(err_sum, std::fabs(hsum16(load16(b)) - s));
    err_max = std::fmax(err_max, std::fabs(hmax16(load16(b)) - m) + std::fabs(hmax16(vmax16(load16(a), load16(b))) -
                                                                           std::fmax(m, hmax16(load16(a)))));
    v16f v = load16(a) * load16(b) + 2.f;
    v += splat16(1.f) - load16(b) * 0.5f;
    v *= 3.f;
    for (int i = 0; i < 16; ++i) err_ops = std::fmax(err_ops, std::fabs(v[i] - 3.f * (a[i] * b[i] + 3.f - b[i] * 0.5f)));
  }
  double err_lin = 0;
  for (int K : {75, 1100, 592})  // K > 1024 takes the 4x3 block without AVX-512; K % 16 == 0 the bf16 even/odd one
    for (int M : {1, 3, 4, 5, 8, 12, 17}) {
      const int N = 131;  // tails in K and in the output rows
      std::vector<float> x(M * K), W(N * K), bias(N), y(M * N), yb(M * N);
      std::vector<uint16_t> Wb(N * K);
      for (auto& t : x) t = rnd();
      for (auto& t : W) t = rnd();
      for (auto& t : bias) t = rnd();
      for (int i = 0; i < N * K; ++i) {  // bf16 copy of W (truncation), and W set to exactly that value
        uint32_t u;
        std::memcpy(&u, &W[i], 4);
        Wb[i] = static_cast<uint16_t>(u >> 16);
        u &= 0xffff0000u;
        std::memcpy(&W[i], &u, 4);
      }
      small_m_linear<float>(x.data(), M, K, W.data(), K, bias.data(), y.data(), N, 1);
      small_m_linear<uint16_t>(x.data(), M, K, Wb.data(), K, bias.data(), yb.data(), N, 1);
      for (int m = 0; m < M; ++m)
        for (int o = 0; o < N; ++o) {
          double r = bias[o];
          for (int k = 0; k < K; ++k) r += double(x[m * K + k]) * W[o * K + k];
          err_lin = std::fmax(err_lin, std::fabs(y[m * N + o] - r));
          err_lin = std::fmax(err_lin, std::fabs(yb[m * N + o] - r));
        }
    }
#ifdef ACCEL_V16F_NATIVE
  const char* form = "native";
#else
  const char* form = "pair";
#endif
  std::printf("%s exp %.3g sum %.3g max %.3g ops %.3g linear %.3g\n", form, err_exp, err_sum, err_max, err_ops, err_lin);
  return 0;
}
