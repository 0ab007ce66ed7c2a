// Timing of the decode-attention kernel alone (accel/cpu/decode_attention.h), torch-free, one thread (or the
// optional third argument's count; the plain sum stays on one): one query per KV head group over L layers' caches
// of T tokens each (SmolLM2's shape: 3 KV heads, 3 query heads per KV head, head_dim 64), in fp32, bf16 and fp16.
// With L = 30 and T = 8000 the caches (369 MB fp32) stream from DRAM, as in a decode
// step; with L = 1 and a small T they stay in cache (compute only). A plain sum over the same bytes, in the same
// order, gives the machine's streaming rate beside it. Compiling it against another commit's header compares kernel
// versions on one machine:
//   mkdir -p /tmp/old/accel/cpu && for h in decode_attention vec_math; do
//     git show <rev>:csrc/include/accel/cpu/$h.h > /tmp/old/accel/cpu/$h.h; done
//   g++ -O3 -march=native -fopenmp -std=c++17 -I /tmp/old csrc/tools/decode_bench.cpp -o /tmp/att_old
//   g++ -O3 -march=native -fopenmp -std=c++17 -I csrc/include csrc/tools/decode_bench.cpp -o /tmp/att_new
//   /tmp/att_new 8000 30      # T L: best of 15 passes over all layers, ms and GB/s of K+V, fp32, bf16 and fp16
//   /tmp/att_new 8000 30 2    # the same on two threads
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "accel/cpu/decode_attention.h"

using namespace accel::cpu;

namespace {

volatile float g_sink;

template <typename T>
float sum_all(const std::vector<T>& x) {  // the streaming reference: four independent 16-lane sums
  v16f a{}, b{}, c{}, d{};
  size_t i = 0;
  for (; i + 64 <= x.size(); i += 64) {
    a += load16(x.data() + i);
    b += load16(x.data() + i + 16);
    c += load16(x.data() + i + 32);
    d += load16(x.data() + i + 48);
  }
  return hsum16(a + b + c + d);
}

template <typename T>
T value(int i) {  // normal values (small integers in bf16 would be denormals)
  if constexpr (std::is_same<T, f16>::value) return f16{static_cast<uint16_t>(0x3800 + i % 128)};  // 0.5 .. 0.56
  else if constexpr (sizeof(T) == 2) return static_cast<T>(0x3f00 + i % 128);
  else return static_cast<T>(i % 7) * 0.25f;
}

template <typename T>
void run(int T_, int L, int threads) {
  const int Hkv = 3, G = 3, H = Hkv * G, D = 64;
  std::vector<std::vector<T>> K(L), V(L);
  for (int l = 0; l < L; ++l) {
    K[l].resize(static_cast<size_t>(Hkv) * T_ * D);
    V[l].resize(K[l].size());
    for (size_t i = 0; i < K[l].size(); ++i) K[l][i] = value<T>(std::rand()), V[l][i] = value<T>(std::rand());
  }
  std::vector<float> q(H * D), out(H * D);
  for (int i = 0; i < H * D; ++i) q[i] = 0.01f * (i % 13);
  if constexpr (sizeof(T) == 2)  // a 16-bit model's queries hold 16-bit values (bf16: the kernel's dot-product tile)
    for (auto& x : q) {
      uint32_t w;
      std::memcpy(&w, &x, sizeof(w));
      w &= 0xFFFF0000u;
      std::memcpy(&x, &w, sizeof(w));
    }
  std::vector<int32_t> len(Hkv, T_);
  double best_att = 1e9, best_sum = 1e9;
  for (int pass = 0; pass < 15; ++pass) {
    auto t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < L; ++l) {
      DecodeParams p;
      p.q = q.data();
      p.k = K[l].data();
      p.v = V[l].data();
      p.k_sh = p.v_sh = static_cast<int64_t>(T_) * D;
      p.k_st = p.v_st = D;
      p.lengths = len.data();
      p.scale = 0.125f;
      p.out = out.data();
      p.B = 1, p.H = H, p.Hkv = Hkv, p.D = D, p.num_threads = threads;
      decode_attention<T>(p);
    }
    auto t1 = std::chrono::steady_clock::now();
    float s = 0.f;
    for (int l = 0; l < L; ++l) s += sum_all(K[l]) + sum_all(V[l]);
    g_sink = s;
    auto t2 = std::chrono::steady_clock::now();
    best_att = std::min(best_att, std::chrono::duration<double>(t1 - t0).count());
    best_sum = std::min(best_sum, std::chrono::duration<double>(t2 - t1).count());
  }
  const double bytes = 2.0 * Hkv * T_ * D * sizeof(T) * L;
  std::printf("%s T=%d L=%d threads=%d: attention %.2f ms (%.1f GB/s), plain sum %.2f ms (%.1f GB/s)\n",
              std::is_same<T, f16>::value ? "fp16" : sizeof(T) == 2 ? "bf16" : "fp32", T_, L, threads, best_att * 1e3, bytes / best_att / 1e9, best_sum * 1e3,
              bytes / best_sum / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: %s T L [threads]\n", argv[0]);
    return 2;
  }
  const int T_ = std::atoi(argv[1]), L = std::atoi(argv[2]), threads = argc == 4 ? std::atoi(argv[3]) : 1;
  run<float>(T_, L, threads);
  run<uint16_t>(T_, L, threads);
  run<f16>(T_, L, threads);
  return 0;
}
