// Small-M linear layer for decode: y[m, o] = sum_k x[m, k] * W[o, k] (+ bias[o]), M <= 16.
// Decode matmuls are matrix-vector products whose cost is streaming W from memory once; BLAS
// single-thread SGEMV reaches only ~half the read bandwidth here. This kernel streams four rows of W
// at a time through 16-lane FMAs, reusing each loaded W vector for up to four rows of x held in
// registers, so W is read exactly once per call. Torch-free.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "accel/cpu/vec_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace accel {
namespace cpu {

// Software prefetch of bf16 W rows a fixed distance ahead, one row at a time as the kernel reaches it: the even/odd
// split costs two operations per load besides the FMAs, and the hardware prefetcher alone did not keep the stream
// ahead of them. On the AVX-512 project machine (2026-12-04, one thread, W from DRAM), SmolLM2's 576x1536 and
// 1536x576 bf16 layers streamed at ~18.5 GB/s without it and 21-28 GB/s with the row ~8 KB ahead requested
// (4 and 16 KB about the same); in the model's decode step (bench/bench_fused.py, SmolLM2 bf16 at 2K, four runs
// alternated with and without) 12.8-16.0 ms against 16.0-16.6 ms a step. fp32 rows: alone, 30-39 GB/s with the requests against 28-31 without,
// but in the decode step 24.4-27.0 against 22.6-22.9 ms (four alternated runs at 2K), so the fp32 kernel does not
// prefetch.
constexpr int64_t kWPfAheadBytes = 8192;

// request the cache lines of row o + ahead of W (rows of K elements, ldw apart); ahead = rows covering
// kWPfAheadBytes. Prefetches never fault: the last `ahead` rows of a matrix request rows past it (wasted requests;
// a guard `o + ahead < N` was not measured).
template <typename T>
static inline int64_t w_prefetch_rows(int K) {
  const int64_t row = static_cast<int64_t>(K) * sizeof(T);
  return std::max<int64_t>(1, (kWPfAheadBytes + row - 1) / row);
}
template <typename T>
static inline void prefetch_w_row(const T* W, int64_t ldw, int64_t o, int K) {
  const char* r = reinterpret_cast<const char*>(W + o * ldw);
  const int64_t bytes = static_cast<int64_t>(K) * sizeof(T);
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(r + c, 0, 3);
}

template <typename T>
static inline float dot_tail(const float* x, const T* w, int k0, int K) {
  float s = 0.f;
  for (int k = k0; k < K; ++k) s += x[k] * Load<T>::get(w, k);
  return s;
}

// A block computes with VecOps<V> (vec_math.h): 16-lane v16f (one zmm with AVX-512, a pair of ymm without) or,
// without AVX-512, the native 8-lane v8f (blocks sized to the 16 ymm registers, below).

// rows [o0, o0+R) of W against rows [m0, m0+MB) of x, in vectors V
template <typename V, typename T, int R, int MB>
static inline void linear_block(const float* x, int64_t ldx, const T* W, int64_t ldw, int K, int o0, int m0,
                                float* y, int64_t ldy, int o_pf = -1) {
  constexpr int L = VecOps<V>::n;
  V acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = V{};
  const int KL = K & ~(L - 1);
  for (int k = 0; k < KL; k += L) {
    V w[R];
    for (int r = 0; r < R; ++r) w[r] = VecOps<V>::load(W + static_cast<int64_t>(o0 + r) * ldw + k);
    if (o_pf >= 0 && (k & 15) == 0)  // the next block's rows, one cache line per row per 16 floats: R short
      for (int r = 0; r < R; ++r)  // streams that the hardware prefetcher follows poorly when W comes from DRAM
        __builtin_prefetch(W + static_cast<int64_t>(o_pf + r) * ldw + k, 0, 0);
    for (int m = 0; m < MB; ++m) {
      const V xv = VecOps<V>::load(x + static_cast<int64_t>(m0 + m) * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] += xv * w[r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const float* xm = x + static_cast<int64_t>(m0 + m) * ldx;
      y[static_cast<int64_t>(m0 + m) * ldy + o0 + r] =
          VecOps<V>::hsum(acc[m][r]) + dot_tail(xm, W + static_cast<int64_t>(o0 + r) * ldw, KL, K);
    }
}

template <typename T, int R>
static inline void linear_rows(const float* x, int M, int K, const T* W, int64_t ldw, int o0, float* y, int N) {
  int m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) linear_block<v16f, T, R, 8>(x, K, W, ldw, K, o0, m0, y, N);
  for (; m0 + 4 <= M; m0 += 4) linear_block<v16f, T, R, 4>(x, K, W, ldw, K, o0, m0, y, N);
  for (; m0 < M; ++m0) linear_block<v16f, T, R, 1>(x, K, W, ldw, K, o0, m0, y, N);
}

#ifndef ACCEL_V16F_NATIVE
// Without AVX-512 (16 ymm registers) the 4x4 block of 16-lane accumulators of the AVX-512 path (in
// small_m_linear) needs 32 registers and spills. There the blocks use native 8-lane vectors sized to the
// register file instead:
//  * x-row blocks of up to 8 rows against one W row (MB accumulators + 1 W + 1 x register): W is read
//    as one sequential stream, exactly once, and each W vector feeds MB FMAs. Used while the x block
//    (MB x K floats) stays in L1 (K <= 1024).
//  * 4 x-rows x 3 W-rows (12 accumulators + 3 + 1), for longer rows, where re-reading x from L2 for
//    every W row would cost more than the three interleaved W streams.
// Measured on the AVX2-only EPYC of the project machines, M=8, W streamed from DRAM (bench/bench_linear.py).

// one W row against all M rows of x, in blocks of 8 rows (the W row stays in L1 across the blocks)
template <typename T>
static inline void linear_row_x8(const float* x, int M, int K, const T* W, int64_t ldw, int o, float* y, int N) {
  int m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) linear_block<v8f, T, 1, 8>(x, K, W, ldw, K, o, m0, y, N, -1);
  switch (M - m0) {
    case 7: linear_block<v8f, T, 1, 7>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 6: linear_block<v8f, T, 1, 6>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 5: linear_block<v8f, T, 1, 5>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 4: linear_block<v8f, T, 1, 4>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 3: linear_block<v8f, T, 1, 3>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 2: linear_block<v8f, T, 1, 2>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 1: linear_block<v8f, T, 1, 1>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    default: break;
  }
}
#endif

// ---- bf16 weights: even/odd lanes instead of widening every element ----
// A bf16 row widened element by element (zero-extend 8 halves to 32 bits, shift) costs two vector operations per 8
// weights besides the FMA, and the GEMV became compute-bound (~9 G weights/s with the data in cache on the AVX2
// project machine, under the memory stream's rate). Read as 32-bit words instead, a run of 16 bf16 weights is
// two fp32 vectors for one operation each: `word << 16` holds the even-indexed weights and `word & 0xffff0000` the
// odd-indexed ones. x is split once per call into its even- and odd-indexed values to match, so each W vector
// load feeds two FMAs. (Only the summation order differs from the widening kernel.)
// rows [m0, m0+MB) of the split x (xs row m: K/2 even values then K/2 odd values) against W row o, K a multiple of
// 2n (n: the native vector's lanes); U runs of 2n weights per iteration (independent accumulators for the single-row
// case). Written over the native vector: 8 lanes on AVX2, 16 with AVX-512 (32 weights per 64-byte load).
template <int MB, int U>
static inline void bf16_row(const float* xs, int K, const uint16_t* w, int o, int m0, float* y, int N) {
  using O = VecOps<vnf>;
  constexpr int n = O::n;
  const int K2 = K / 2;
  vnf ae[MB][U], ao[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) ae[m][u] = ao[m][u] = vnf{};
  int k = 0;
  for (; k + 2 * n * U <= K; k += 2 * n * U)
    for (int u = 0; u < U; ++u) {
      vnf we, wo;
      O::load_even_odd(w + k + 2 * n * u, we, wo);
      for (int m = 0; m < MB; ++m) {
        const float* xm = xs + static_cast<int64_t>(m0 + m) * K;
        ae[m][u] += O::load(xm + k / 2 + n * u) * we;
        ao[m][u] += O::load(xm + K2 + k / 2 + n * u) * wo;
      }
    }
  for (; k < K; k += 2 * n) {
    vnf we, wo;
    O::load_even_odd(w + k, we, wo);
    for (int m = 0; m < MB; ++m) {
      const float* xm = xs + static_cast<int64_t>(m0 + m) * K;
      ae[m][0] += O::load(xm + k / 2) * we;
      ao[m][0] += O::load(xm + K2 + k / 2) * wo;
    }
  }
  for (int m = 0; m < MB; ++m) {
    vnf t = ae[m][0] + ao[m][0];
    for (int u = 1; u < U; ++u) t += ae[m][u] + ao[m][u];
    y[static_cast<int64_t>(m0 + m) * N + o] = O::hsum(t);
  }
}

inline void small_m_linear_bf16_split(const float* x, int M, int K, const uint16_t* W, int64_t ldw, float* y, int N,
                                      int num_threads) {
  std::vector<float> xs(static_cast<size_t>(M) * K);
  const int K2 = K / 2;
  for (int m = 0; m < M; ++m)
    for (int i = 0; i < K2; ++i) {
      xs[static_cast<size_t>(m) * K + i] = x[static_cast<int64_t>(m) * K + 2 * i];
      xs[static_cast<size_t>(m) * K + K2 + i] = x[static_cast<int64_t>(m) * K + 2 * i + 1];
    }
  const float* xp = xs.data();
  const int nblk = (N + 63) / 64;
  const int64_t ahead = w_prefetch_rows<uint16_t>(K);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int blk = 0; blk < nblk; ++blk) {
    const int o_end = std::min(N, (blk + 1) * 64);
    for (int o = blk * 64; o < o_end; ++o) {
      const uint16_t* w = W + static_cast<int64_t>(o) * ldw;
      prefetch_w_row(W, ldw, o + ahead, K);
      int m0 = 0;
      if (M == 1) {
        bf16_row<1, 4>(xp, K, w, o, 0, y, N);
        continue;
      }
      for (; m0 + 4 <= M; m0 += 4) bf16_row<4, 1>(xp, K, w, o, m0, y, N);
      switch (M - m0) {
        case 3: bf16_row<3, 1>(xp, K, w, o, m0, y, N); break;
        case 2: bf16_row<2, 1>(xp, K, w, o, m0, y, N); break;
        case 1: bf16_row<1, 2>(xp, K, w, o, m0, y, N); break;
        default: break;
      }
    }
  }
}

#if defined(ACCEL_V16F_NATIVE) && defined(__AVX512BF16__)
#define ACCEL_BF16_DOT 1
// ---- bf16 weights against bf16 activations: vdpbf16ps (AVX512_BF16) ----
// With the data in cache the even/odd kernel above runs at ~60 GB/s of W, but with W from DRAM at ~18 (no software
// prefetch) to 21-28 GB/s (prefetch): its six operations per 64-byte W vector (load, shift, and, two x loads, two
// FMAs) fill the reorder window, so too few W loads are in flight to cover the memory latency. vdpbf16ps multiplies 32
// bf16 pairs and adds them into 16 fp32 lanes in one operation, three per W vector with the loads; on the AVX-512
// project machine (2026-12-05, one thread, a scratch harness, SmolLM2's 576x1536, 1536x576 and 576x576 layers from
// DRAM) it streamed W at 37-39 GB/s with the row 4 KB ahead requested (plain reads of the same buffers: 38-39), the
// even/odd kernel at 17-20 in the same harness. It needs x in bf16: x is rounded to bf16 (round to nearest even) once
// per call, which is exact when x holds bf16 values (a bf16 model's activations, as transformers hands them to a
// linear layer); the products are then exact in fp32 and only the summation order differs from the widening kernel.
// (vdpbf16ps treats denormal inputs as zero.)
constexpr int64_t kWDotPfAheadBytes = 4096;

// rows [m0, m0+MB) of bf16 x (xb, K per row) against W row w, K a multiple of 32; U runs of 32 per iteration
template <int MB, int U>
static inline void bf16_dot_row(const uint16_t* xb, int K, const uint16_t* w, int o, int m0, float* y, int N) {
  __m512 acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 32 * U <= K; k += 32 * U)
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < MB; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_loadu_si512(xb + static_cast<int64_t>(m0 + m) * K + k + 32 * u), wv);
    }
  for (; k < K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < MB; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(xb + static_cast<int64_t>(m0 + m) * K + k), wv);
  }
  for (int m = 0; m < MB; ++m) {
    __m512 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][u]);
    y[static_cast<int64_t>(m0 + m) * N + o] = _mm512_reduce_add_ps(t);
  }
}

// y = bf16(x) W^T for bf16 W [N, K] (row stride ldw), K a multiple of 32
inline void small_m_linear_bf16_dot(const float* x, int M, int K, const uint16_t* W, int64_t ldw, float* y, int N,
                                    int num_threads) {
  std::vector<uint16_t> xb(static_cast<size_t>(M) * K);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; k += 32) {
      const float* src = x + static_cast<int64_t>(m) * K + k;
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));  // lanes in order
      _mm512_storeu_si512(xb.data() + static_cast<size_t>(m) * K + k, (__m512i)b);
    }
  const uint16_t* xp = xb.data();
  const int64_t row = static_cast<int64_t>(K) * 2;
  const int64_t ahead = std::max<int64_t>(1, (kWDotPfAheadBytes + row - 1) / row);
  const int nblk = (N + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int blk = 0; blk < nblk; ++blk) {
    const int o_end = std::min(N, (blk + 1) * 64);
    for (int o = blk * 64; o < o_end; ++o) {
      const uint16_t* w = W + static_cast<int64_t>(o) * ldw;
      prefetch_w_row(W, ldw, o + ahead, K);
      if (M == 1) {
        bf16_dot_row<1, 4>(xp, K, w, o, 0, y, N);
        continue;
      }
      int m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) bf16_dot_row<4, 1>(xp, K, w, o, m0, y, N);
      switch (M - m0) {
        case 3: bf16_dot_row<3, 1>(xp, K, w, o, m0, y, N); break;
        case 2: bf16_dot_row<2, 1>(xp, K, w, o, m0, y, N); break;
        case 1: bf16_dot_row<1, 2>(xp, K, w, o, m0, y, N); break;
        default: break;
      }
    }
  }
}
#endif

#ifdef ACCEL_V16F_NATIVE
// one fp32 W row against one x row with U independent 16-lane accumulators: a single accumulator made each row a
// chain of K/16 dependent FMAs (latency-bound, ~80% of the read bandwidth with W from DRAM on the AVX-512 project
// machine)
template <int U>
static inline float f32_row(const float* x, const float* w, int K) {
  v16f a[U];
  for (int u = 0; u < U; ++u) a[u] = v16f{};
  int k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) a[u] += load16(x + k + 16 * u) * load16(w + k + 16 * u);
  for (; k + 16 <= K; k += 16) a[0] += load16(x + k) * load16(w + k);
  for (int u = 1; u < U; ++u) a[0] += a[u];
  return hsum16(a[0]) + dot_tail(x, w, k, K);
}
// the same for one fp16 W row (widened by vcvtph2ps)
template <int U>
static inline float half_row(const float* x, const f16* w, int K) {
  v16f a[U];
  for (int u = 0; u < U; ++u) a[u] = v16f{};
  int k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) a[u] += load16(x + k + 16 * u) * load16(w + k + 16 * u);
  for (; k + 16 <= K; k += 16) a[0] += load16(x + k) * load16(w + k);
  for (int u = 1; u < U; ++u) a[0] += a[u];
  return hsum16(a[0]) + dot_tail(x, w, k, K);
}
#endif

// x_bf16 (bf16 W only): x may be rounded to bf16 (it holds bf16 values, or the caller accepts the rounding); on CPUs
// with AVX512_BF16 the product then runs on vdpbf16ps (small_m_linear_bf16_dot), elsewhere it is ignored
template <typename T>
inline void small_m_linear(const float* x, int M, int K, const T* W, int64_t ldw, const float* bias, float* y,
                           int N, int num_threads, bool x_bf16 = false) {
  (void)x_bf16;
  if constexpr (std::is_same<T, uint16_t>::value) {  // bf16
#ifdef ACCEL_BF16_DOT
    if (x_bf16 && K % 32 == 0) {
      small_m_linear_bf16_dot(x, M, K, W, ldw, y, N, num_threads);
      if (bias)
        for (int m = 0; m < M; ++m)
          for (int o = 0; o < N; ++o) y[static_cast<int64_t>(m) * N + o] += bias[o];
      return;
    }
#endif
    if (K % (2 * kLanes) == 0) {
      small_m_linear_bf16_split(x, M, K, W, ldw, y, N, num_threads);
      if (bias)
        for (int m = 0; m < M; ++m)
          for (int o = 0; o < N; ++o) y[static_cast<int64_t>(m) * N + o] += bias[o];
      return;
    }
  }
#ifdef ACCEL_V16F_NATIVE
  if constexpr (sizeof(T) == 4) {
    if (M == 1) {  // (no software prefetch here: see kWPfAheadBytes)
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
      for (int o = 0; o < N; ++o)
        y[o] = f32_row<4>(x, W + static_cast<int64_t>(o) * ldw, K) + (bias ? bias[o] : 0.f);
      return;
    }
  }
  if constexpr (std::is_same<T, f16>::value) {
    if (M == 1) {  // fp16 rows: half_row, with the W row kWPfAheadBytes ahead requested as with bf16
      const int64_t ahead = w_prefetch_rows<f16>(K);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
      for (int o = 0; o < N; ++o) {
        prefetch_w_row(W, ldw, o + ahead, K);
        y[o] = half_row<4>(x, W + static_cast<int64_t>(o) * ldw, K) + (bias ? bias[o] : 0.f);
      }
      return;
    }
  }
#endif
  const int nblk = (N + 63) / 64;  // 64 output rows per work item
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int blk = 0; blk < nblk; ++blk) {
    const int o_end = std::min(N, (blk + 1) * 64);
    int o = blk * 64;
#ifndef ACCEL_V16F_NATIVE
    if (M >= 4) {
      if (K <= 1024) {
        for (; o < o_end; ++o) linear_row_x8<T>(x, M, K, W, ldw, o, y, N);
      } else {
        for (; o + 3 <= o_end; o += 3) {
          const int pf = o + 6 <= N ? o + 3 : -1;
          int m0 = 0;
          for (; m0 + 4 <= M; m0 += 4) linear_block<v8f, T, 3, 4>(x, K, W, ldw, K, o, m0, y, N, m0 == 0 ? pf : -1);
          for (; m0 < M; ++m0) linear_block<v8f, T, 3, 1>(x, K, W, ldw, K, o, m0, y, N, -1);
        }
        for (; o < o_end; ++o) linear_row_x8<T>(x, M, K, W, ldw, o, y, N);
      }
    }
#else
    if (M >= 4) {
      // several rows of x: the FMA count per W byte grows with M, so the kernel is compute-bound, not
      // bandwidth-bound. Four W rows x four x rows per block keep 16 accumulators in registers and
      // load 8 vectors per 16 FMAs (one W row x eight x rows loads 9 per 8 and ran at ~7 GB/s).
      for (; o + 4 <= o_end; o += 4) {
        const int pf = o + 8 <= N ? o + 4 : -1;  // prefetch the next block during the first m-block
        int m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) linear_block<v16f, T, 4, 4>(x, K, W, ldw, K, o, m0, y, N, m0 == 0 ? pf : -1);
        for (; m0 < M; ++m0) linear_block<v16f, T, 4, 1>(x, K, W, ldw, K, o, m0, y, N, m0 == 0 ? pf : -1);
      }
    }
#endif
    // one W row at a time: a single sequential stream through W is what the hardware prefetcher
    // follows best (4 interleaved rows measured at ~half the bandwidth on the project machine for M=1)
    for (; o < o_end; ++o) linear_rows<T, 1>(x, M, K, W, ldw, o, y, N);
  }
  if (bias)
    for (int m = 0; m < M; ++m)
      for (int o = 0; o < N; ++o) y[static_cast<int64_t>(m) * N + o] += bias[o];
}

}  // namespace cpu
}  // namespace accel
