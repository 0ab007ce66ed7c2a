// Small-M linear layer for decode: y[m, o] = sum_k x[m, k] * W[o, k] (+ bias[o]), M <= 16.
// Decode matmuls are matrix-vector products whose cost is streaming W from memory once; BLAS
// single-thread SGEMV reaches only ~half the read bandwidth here. This kernel streams four rows of W
// at a time through 16-lane FMAs, reusing each loaded W vector for up to four rows of x held in
// registers, so W is read exactly once per call. Torch-free.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "accel/cpu/vec_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace accel {
namespace cpu {

template <typename T>
static inline float dot_tail(const float* x, const T* w, int k0, int K) {
  float s = 0.f;
  for (int k = k0; k < K; ++k) s += x[k] * Load<T>::get(w, k);
  return s;
}

// rows [o0, o0+R) of W against rows [m0, m0+MB) of x
template <typename T, int R, int MB>
static inline void linear_block(const float* x, int64_t ldx, const T* W, int64_t ldw, int K, int o0, int m0,
                                float* y, int64_t ldy, int o_pf = -1) {
  v16f acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = v16f{};
  const int K16 = K & ~15;
  for (int k = 0; k < K16; k += 16) {
    v16f w[R];
    for (int r = 0; r < R; ++r) w[r] = load16(W + static_cast<int64_t>(o0 + r) * ldw + k);
    if (o_pf >= 0)  // the next block's rows, one cache line per row per step: R short streams that the
      for (int r = 0; r < R; ++r)  // hardware prefetcher follows poorly when W comes from DRAM
        __builtin_prefetch(W + static_cast<int64_t>(o_pf + r) * ldw + k, 0, 0);
    for (int m = 0; m < MB; ++m) {
      const v16f xv = load16(x + static_cast<int64_t>(m0 + m) * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] += xv * w[r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const float* xm = x + static_cast<int64_t>(m0 + m) * ldx;
      y[static_cast<int64_t>(m0 + m) * ldy + o0 + r] =
          hsum16(acc[m][r]) + dot_tail(xm, W + static_cast<int64_t>(o0 + r) * ldw, K16, K);
    }
}

template <typename T, int R>
static inline void linear_rows(const float* x, int M, int K, const T* W, int64_t ldw, int o0, float* y, int N) {
  int m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) linear_block<T, R, 8>(x, K, W, ldw, K, o0, m0, y, N);
  for (; m0 + 4 <= M; m0 += 4) linear_block<T, R, 4>(x, K, W, ldw, K, o0, m0, y, N);
  for (; m0 < M; ++m0) linear_block<T, R, 1>(x, K, W, ldw, K, o0, m0, y, N);
}

#ifndef ACCEL_V16F_NATIVE
// Without AVX-512 (16 ymm registers) the 4x4 block of 16-lane accumulators above needs 32 registers and
// spills. These blocks use native 8-lane vectors sized to the register file instead:
//  * x-row blocks of up to 8 rows against one W row (MB accumulators + 1 W + 1 x register): W is read
//    as one sequential stream, exactly once, and each W vector feeds MB FMAs. Used while the x block
//    (MB x K floats) stays in L1 (K <= 1024).
//  * 4 x-rows x 3 W-rows (12 accumulators + 3 + 1), for longer rows, where re-reading x from L2 for
//    every W row would cost more than the three interleaved W streams.
// Measured on the AVX2-only EPYC of the project machines, M=8, W streamed from DRAM (bench/bench_linear.py).
template <typename T> static inline v8f load8w(const T* p);
template <> inline v8f load8w<float>(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <> inline v8f load8w<uint16_t>(const uint16_t* p) { return load8_bf16(p); }

template <typename T, int R, int MB>
static inline void linear_block8(const float* x, int64_t ldx, const T* W, int64_t ldw, int K, int o0, int m0,
                                 float* y, int64_t ldy, int o_pf) {
  v8f acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = v8f{};
  const int K8 = K & ~7;
  for (int k = 0; k < K8; k += 8) {
    v8f w[R];
    for (int r = 0; r < R; ++r) w[r] = load8w<T>(W + static_cast<int64_t>(o0 + r) * ldw + k);
    if (o_pf >= 0 && (k & 15) == 0)  // one 64-byte line of each of the next block's rows
      for (int r = 0; r < R; ++r) __builtin_prefetch(W + static_cast<int64_t>(o_pf + r) * ldw + k, 0, 0);
    for (int m = 0; m < MB; ++m) {
      v8f xv;
      std::memcpy(&xv, x + static_cast<int64_t>(m0 + m) * ldx + k, sizeof(xv));
      for (int r = 0; r < R; ++r) acc[m][r] += xv * w[r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const float* xm = x + static_cast<int64_t>(m0 + m) * ldx;
      y[static_cast<int64_t>(m0 + m) * ldy + o0 + r] =
          hsum8(acc[m][r]) + dot_tail(xm, W + static_cast<int64_t>(o0 + r) * ldw, K8, K);
    }
}

// one W row against all M rows of x, in blocks of 8 rows (the W row stays in L1 across the blocks)
template <typename T>
static inline void linear_row_x8(const float* x, int M, int K, const T* W, int64_t ldw, int o, float* y, int N) {
  int m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) linear_block8<T, 1, 8>(x, K, W, ldw, K, o, m0, y, N, -1);
  switch (M - m0) {
    case 7: linear_block8<T, 1, 7>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 6: linear_block8<T, 1, 6>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 5: linear_block8<T, 1, 5>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 4: linear_block8<T, 1, 4>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 3: linear_block8<T, 1, 3>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 2: linear_block8<T, 1, 2>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    case 1: linear_block8<T, 1, 1>(x, K, W, ldw, K, o, m0, y, N, -1); break;
    default: break;
  }
}
#endif

template <typename T>
inline void small_m_linear(const float* x, int M, int K, const T* W, int64_t ldw, const float* bias, float* y,
                           int N, int num_threads) {
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
          for (; m0 + 4 <= M; m0 += 4) linear_block8<T, 3, 4>(x, K, W, ldw, K, o, m0, y, N, m0 == 0 ? pf : -1);
          for (; m0 < M; ++m0) linear_block8<T, 3, 1>(x, K, W, ldw, K, o, m0, y, N, -1);
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
        for (; m0 + 4 <= M; m0 += 4) linear_block<T, 4, 4>(x, K, W, ldw, K, o, m0, y, N, m0 == 0 ? pf : -1);
        for (; m0 < M; ++m0) linear_block<T, 4, 1>(x, K, W, ldw, K, o, m0, y, N, m0 == 0 ? pf : -1);
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
