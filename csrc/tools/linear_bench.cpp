// Timing of the small-M decode linear kernel alone (accel/cpu/linear.h), torch-free, one thread, W streamed
// from DRAM (enough distinct weight copies to exceed the last-level cache). Compiling it against another
// commit's header compares kernel versions on one machine:
//   git show <rev>:csrc/include/accel/cpu/linear.h > /tmp/old/accel/cpu/linear.h   (+ vec_math.h beside it)
//   g++ -O3 -march=native -std=c++17 -I /tmp/old csrc/tools/linear_bench.cpp -o /tmp/lin_old
//   g++ -O3 -march=native -std=c++17 -I csrc/include csrc/tools/linear_bench.cpp -o /tmp/lin_new
//   /tmp/lin_new 8 576 1536     # M K N: prints the best of 7 passes, ms per call, GFLOP/s and GB/s of W
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "accel/cpu/linear.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s M K N\n", argv[0]);
    return 2;
  }
  const int M = std::atoi(argv[1]), K = std::atoi(argv[2]), N = std::atoi(argv[3]);
  const size_t wsz = static_cast<size_t>(N) * K;
  const int nbuf = static_cast<int>(std::max<size_t>(2, 200000000 / (wsz * 4)));
  std::vector<std::vector<float>> Ws(nbuf, std::vector<float>(wsz));
  std::srand(0);
  for (auto& w : Ws)
    for (auto& v : w) v = (std::rand() % 2000 - 1000) / 1000.f;
  std::vector<float> x(static_cast<size_t>(M) * K), y(static_cast<size_t>(M) * N);
  for (auto& v : x) v = (std::rand() % 2000 - 1000) / 1000.f;
  double best = 1e9;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < nbuf; ++i)
      accel::cpu::small_m_linear<float>(x.data(), M, K, Ws[i].data(), K, nullptr, y.data(), N, 1);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / nbuf);
  }
  std::printf("M=%d K=%d N=%d %.4f ms %.1f GFLOP/s %.2f GB/s\n", M, K, N, best * 1e3, 2.0 * M * K * N / best / 1e9,
              wsz * 4 / best / 1e9);
  return 0;
}
