// Decode attention (one new query per sequence) over accel's preallocated KV cache, CPU.
// Torch-free: raw pointers and strides only, so the same header is usable from any binding.
//
// Layout: K/V element (b, h, t, d) lives at base + b*sb + h*sh + t*st + d (d contiguous), which
// matches accel's cache buffers [B, Hkv, capacity, D] and any strided view of them.
// Per (b, kv-head) a token count `lengths[b*Hkv+h]` (ragged per head, for KV compression) and,
// optionally, an index list `indices[(b*Hkv+h)*idx_stride + i]` (sparse decode: the i-th attended
// token is indices[...]) and a per-sequence validity mask `valid[b*valid_sb + t]` (left padding,
// sliding windows). With `offsets`, K/V are one shared pool of rows and head bh's tokens start at row
// offsets[bh] (the ragged per-head cache of KV compression). GQA: the G = H/Hkv query heads of a group are processed together so every K/V
// row is read from memory exactly once per step.
//
// Numerics: fp32 accumulation, online (streaming) softmax in tiles of kTile tokens (16 on AVX2, 64 with AVX-512), flash-decoding
// style split over the token axis with a log-sum-exp merge for parallelism.
#pragma once
#include <type_traits>
#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "accel/cpu/vec_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace accel {
namespace cpu {

struct DecodeParams {
  const float* q = nullptr;  // [B, H, D] contiguous fp32
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_sb = 0, k_sh = 0, k_st = 0;
  int64_t v_sb = 0, v_sh = 0, v_st = 0;
  const int32_t* lengths = nullptr;  // [B*Hkv]
  // optional ragged pool: (b, kv-head) bh's token t lives at row offsets[bh] + t of a shared row pool
  // (k_sb = k_sh = 0), so every head owns exactly the rows it keeps (KV compression)
  const int64_t* offsets = nullptr;  // [B*Hkv] or nullptr
  const int32_t* indices = nullptr;  // [B*Hkv*idx_stride] or nullptr
  int64_t idx_stride = 0;
  // optional, with indices: which query heads of the group attend each entry, bit g for query head kh * G + g
  // (head_mask[(b*Hkv+h)*idx_stride + i]). A KV head's G query heads then attend to different token sets while each
  // listed row is read once for all of them (the union of Quest's per-query-head page sets, agg="none"); a head's
  // unset entries count as masked (logit -inf, weight exactly 0; as with masked padding, a value row holding inf or
  // NaN still reaches a head through 0 * inf = NaN).
  const uint64_t* head_mask = nullptr;
  const uint8_t* valid = nullptr;    // [B*valid_sb] or nullptr (only with position-addressed tokens)
  int64_t valid_sb = 0;
  int64_t valid_len = 0;             // positions >= valid_len count as valid
  float scale = 1.0f;
  float* out = nullptr;  // [B, H, D] fp32
  float* lse = nullptr;  // [B, H] fp32 or nullptr
  // optional: the scaled logits q.k*scale of every attended token, written at its token position,
  // scores[(b*H + h)*scores_stride + t] (masked tokens: -inf). Layer-reuse anchors (HyLRA, DELTA)
  // select their top-k from these instead of reading K a second time.
  float* scores = nullptr;
  int64_t scores_stride = 0;
  int B = 0, H = 0, Hkv = 0, D = 0;
  int num_threads = 0;   // 0: OpenMP default
};

// tokens per tile (scores, one online-softmax update, values). AVX-512 builds take 64: the per-tile work (softmax
// update, the accumulators' reload) spread over more tokens. On the AVX-512 project machine (30 layers x 8K tokens,
// 3 KV heads, G = 3, from DRAM, a scratch harness, 2026-12-04) 64 against 16 with the same tiles: bf16 ~10 against
// ~16 ms, fp32 ~20 against ~21 ms (32 and 128 measured no better).
#ifdef ACCEL_V16F_NATIVE
constexpr int kTile = 64;
#else
constexpr int kTile = 16;
#endif
constexpr int kMaxGroup = 64;

// Software prefetch of contiguous rows a fixed distance ahead, one row at a time as the tiles read them. The score
// and value tiles compute enough per row (G*D FMAs, the sums, the softmax) that the hardware prefetcher alone does not
// stay ahead of them: on the AVX-512 project machine (30 layers x 8K tokens, 3 KV heads, G = 3, fp32, from DRAM,
// csrc/tools/decode_bench.cpp, 2026-12-04) the kernel read 14-16 GB/s without it and 24-25 GB/s with rows requested
// 4-8 KB ahead (a plain sum of the same bytes: 33-37 GB/s); 12-16 KB ahead about the same in fp32, slower in bf16
// (ACCEL_DECODE_PF_BYTES sets the distance, at least one row, for such comparisons). Requests
// issued a whole tile at a time, at a tile's start, were slower than none (they fill the miss buffers at once). In the
// model's decode step (bench/bench_fused.py, SmolLM2 at 8K, three runs alternated against requests for the row being
// read) fp32 33.5-36.8 against 37.8-39.9 ms a step, bf16 18.5-19.4 against 19.1-20.2 ms.
// rows of a run of consecutive indices requested by software before the hardware prefetcher is left to follow it
// (index-list reads; see attend_span); settable for comparisons
#ifndef ACCEL_DECODE_PF_RUN
#define ACCEL_DECODE_PF_RUN 2
#endif
#ifndef ACCEL_DECODE_PF_RUN_BYTES
#define ACCEL_DECODE_PF_RUN_BYTES 4096
#endif
#ifndef ACCEL_DECODE_PF_BYTES
#define ACCEL_DECODE_PF_BYTES 8192
#endif
constexpr int64_t kPfAheadBytes = ACCEL_DECODE_PF_BYTES;

// Cross-stream requests (contiguous rows): a tile reads one stream (K in its score pass, V in its value pass), so
// requests of the row being read keep only that stream in flight, and the other one's requests wait for its pass.
// The score pass therefore also requests the V rows of the same tokens kXPfBytes ahead (the value pass that follows
// finds them arriving), and the value pass the next tile's K rows kXPfBytes past its start. On the AVX-512 project
// machine (AMD EPYC, 30 layers x 8K tokens, 3 KV heads, G = 3, from DRAM, csrc/tools/decode_bench.cpp, 2026-12-07,
// three runs each) fp32 read 27.5-28.5 GB/s without them and 37.0-38.5 GB/s with them at 8 KB (the same bytes summed:
// 38.5-39.2 GB/s); a first harness read 31-34 GB/s at 2-8 KB and 29-30 at 16 KB;
// with the caches in L2 the extra requests cost ~10% (54 against 48-49 GB/s). The bf16 tiles (split below) read at
// the plain sum's rate without them and do not make them. 0 turns them off.
// 0: index-list rows requested by software prefetches one tile ahead instead of read by a touch pass (for comparisons;
// see touch_rows in attend_span)
#ifndef ACCEL_DECODE_IDX_TOUCH
#define ACCEL_DECODE_IDX_TOUCH 1
#endif
// 1: bf16 scores always on the even/odd tile (for comparisons; see tile_scores_dot)
#ifndef ACCEL_DECODE_NO_BF16_DOT
#define ACCEL_DECODE_NO_BF16_DOT 0
#endif

#ifndef ACCEL_DECODE_XPF_BYTES
#define ACCEL_DECODE_XPF_BYTES 8192
#endif
constexpr int64_t kXPfBytes = ACCEL_DECODE_XPF_BYTES;

// the other stream of a tile: its base, row stride and how far ahead (elements) of a token's row to request
template <typename T>
struct CrossRows {
  const T* base = nullptr;
  int64_t st = 0;
  int64_t ahead = 0;  // 0: no cross-stream requests
};

// request the cache lines of the row `ahead` elements after `row` (prefetches never fault: the rows requested past the
// end of a span, up to kPfAheadBytes of them, are wasted requests). ahead = 0 (index lists, which make their own
// requests one tile ahead) requests the row about to be read: a few redundant instructions per row, measured
// unchanged on a 1/4-selection harness. GCC 12 at -O2/-O3 emitted none of this function's requests while it began
// with `if (ahead == 0) return;` (no prefetcht0 in objdump -d of the built kernels), hence no such test.
template <typename T, int DC>
static inline void prefetch_row_ahead(const T* row, int64_t ahead) {
  const char* r = reinterpret_cast<const char*>(row + ahead);
  for (int c = 0; c < DC * static_cast<int>(sizeof(T)); c += 64) __builtin_prefetch(r + c, 0, 3);
}

// The K rows of the R-row block at j0 of a tile's n tokens (rows past n repeat the last one: computed, not stored),
// each requested pf elements ahead, and with x.ahead the other stream's rows of the same tokens (see CrossRows)
template <typename T, int DC, int R>
static inline void block_rows(const T* kb, int64_t k_st, const int64_t* tok, int j0, int n, int64_t pf, const T** kr,
                              CrossRows<T> x = {}) {
  for (int jj = 0; jj < R; ++jj) kr[jj] = kb + tok[std::min(j0 + jj, n - 1)] * k_st;
  for (int jj = 0; jj < R; ++jj) prefetch_row_ahead<T, DC>(kr[jj], pf);
  if (x.ahead)
    for (int jj = 0; jj < R; ++jj) prefetch_row_ahead<T, DC>(x.base + tok[std::min(j0 + jj, n - 1)] * x.st, x.ahead);
}

// ---- the register-blocked tiles of the common shapes (head_dim a multiple of the vector, 1-4 query heads per KV
// head), written once over the native vector V (8 lanes on AVX2, 16 with AVX-512) ----
// Scores: R K rows at a time against all G heads of the group: per vector chunk, R K loads and G query loads feed
// G*R FMAs into G*R accumulators, so each K chunk is loaded once for the whole group, and the accumulators are reduced
// four at a time (one reduction tree per 4 sums). (Head by head, the K rows were re-read from L1 for every head: 40
// loads per 32 FMAs, load-bound.) Values: the group's accumulators for CB vector chunks of the head stay in registers
// across the whole tile. Block sizes come from the register count: R = 4, 4, 3, 2 for G = 1..4 with AVX2's 16
// registers (at most 12 accumulators + R rows + one query chunk; measured on the AVX2 project machine, G = 3, head_dim
// 64, data in cache: 29 ns per token and KV head against 41 for a horizontal sum per token and head), and
// R = 8, 8, 4, 4 with AVX-512's 32 (there this tile serves bf16 on even/odd lanes; fp32 takes tile_scores16 below);
// CB = 2 chunks on AVX2, the whole head (or the largest divisor of it that fits) with AVX-512.
template <int G>
constexpr int score_rows() {
  if constexpr (kVecRegs >= 32) return G <= 2 ? 8 : 4;
  return G == 1 ? 4 : (G == 2 ? 4 : (G == 3 ? 3 : 2));
}

// value chunks per pass: G*CB accumulators + CB row chunks + one broadcast within the register file, CB | NC
template <int G, int NC>
constexpr int value_chunks() {
  if constexpr (kVecRegs < 32) return NC % 2 == 0 ? 2 : 1;
  int cb = NC;
  while (cb > 1 && (G * cb + cb + 2 > kVecRegs || NC % cb != 0)) --cb;
  return cb;
}

template <typename V, int NA>
static inline void reduce_scores(const V* acc, float* r) {  // r[i] = sum(acc[i]), i < NA
  int i = 0;
  for (; i + 4 <= NA; i += 4) {
    const v4f x = VecOps<V>::hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
    r[i] = x[0]; r[i + 1] = x[1]; r[i + 2] = x[2]; r[i + 3] = x[3];
  }
  for (; i < NA; ++i) r[i] = VecOps<V>::hsum(acc[i]);
}

// s[g][j0 + jj] = scale * sum(acc[g * R + jj]) for the m valid rows of an R-row block
template <typename V, int G, int R>
static inline void store_scores(const V* acc, int j0, int m, float scale, float (*s)[kTile]) {
  float r[G * R];
  reduce_scores<V, G * R>(acc, r);
  for (int g = 0; g < G; ++g)
    for (int jj = 0; jj < m; ++jj) s[g][j0 + jj] = r[g * R + jj] * scale;
}

// s[g][j] = scale * q_g . K[tok[j]] for j < n (rows of masked tokens are computed and overwritten by the caller)
template <typename V, typename T, int DC, int G>
static inline void tile_scores(const float* q, const T* kb, int64_t k_st, const int64_t* tok, int n, float scale,
                               float (*s)[kTile], int64_t pf, CrossRows<T> x) {
  using O = VecOps<V>;
  constexpr int NC = DC / O::n, R = score_rows<G>();
  for (int j0 = 0; j0 < n; j0 += R) {
    const T* kr[R];
    block_rows<T, DC, R>(kb, k_st, tok, j0, n, pf, kr, x);
    const int m = std::min(R, n - j0);
    V acc[G * R];
    for (int i = 0; i < G * R; ++i) acc[i] = V{};
    for (int c = 0; c < NC; ++c) {
      V kv[R];
      for (int jj = 0; jj < R; ++jj) kv[jj] = O::load(kr[jj] + O::n * c);
      for (int g = 0; g < G; ++g) {
        const V qv = O::load(q + g * DC + O::n * c);
        for (int jj = 0; jj < R; ++jj) acc[g * R + jj] += qv * kv[jj];
      }
    }
    store_scores<V, G, R>(acc, j0, m, scale, s);
  }
}

// live[j]: some head of the group gives token j a nonzero weight (the value tiles skip the others' rows)
template <int G>
static inline void live_rows(const float (*p)[kTile], int n, bool* live) {
  for (int j = 0; j < n; ++j) {
    bool l = false;
    for (int g = 0; g < G; ++g) l |= p[g][j] != 0.f;
    live[j] = l;
  }
}

// acc_g += sum_j p[g][j] * V[tok[j]] for the group's heads (p = 0 for masked tokens, whose rows are skipped)
template <typename V, typename T, int DC, int G>
static inline void tile_values(float* acc, const T* vb, int64_t v_st, const int64_t* tok, int n,
                               const float (*p)[kTile], int64_t pf, CrossRows<T> x) {
  using O = VecOps<V>;
  constexpr int NC = DC / O::n, CB = value_chunks<G, NC>();
  bool live[kTile];
  live_rows<G>(p, n, live);
  for (int c0 = 0; c0 < NC; c0 += CB) {
    V a[G][CB];
    for (int g = 0; g < G; ++g)
      for (int cb = 0; cb < CB; ++cb) a[g][cb] = O::load(acc + g * DC + O::n * (c0 + cb));
    for (int j = 0; j < n; ++j) {
      if (!live[j]) continue;
      const T* vr = vb + tok[j] * v_st + O::n * c0;
      if (c0 == 0) prefetch_row_ahead<T, DC>(vr, pf);
      if (c0 == 0 && x.ahead) prefetch_row_ahead<T, DC>(x.base + tok[j] * x.st, x.ahead);
      V vv[CB];
      for (int cb = 0; cb < CB; ++cb) vv[cb] = O::load(vr + O::n * cb);
      for (int g = 0; g < G; ++g) {
        const V pv = O::splat(p[g][j]);
        for (int cb = 0; cb < CB; ++cb) a[g][cb] += pv * vv[cb];
      }
    }
    for (int g = 0; g < G; ++g)
      for (int cb = 0; cb < CB; ++cb) std::memcpy(acc + g * DC + O::n * (c0 + cb), &a[g][cb], sizeof(V));
  }
}

#ifdef ACCEL_V16F_NATIVE
// ---- AVX-512: scores of 8 (or 4) rows per head reduced by one transposing tree ----
// With 16-lane accumulators a horizontal sum per score (or per 4 scores) cost as much as the FMAs. Here each head keeps
// one accumulator per row of an R-row block (G*R <= 24 of the 32 zmm registers), and the block's R sums of a head come
// out of one tree of two-source shuffles as one vector (3 operations per score instead of ~6), stored whole.
// lane i of the result = sum of all lanes of a[i], i < 8
static inline v8f transpose_sum8(const v16f* a) {
  v16f x[4], y[2];
  for (int i = 0; i < 4; ++i)  // [a_2i (8 partial sums), a_2i+1 (8)]
    x[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // 4 partial sums of each of four rows
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const v16f z =  // 2 partial sums of each of the eight rows
      __builtin_shufflevector(y[0], y[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
      __builtin_shufflevector(y[0], y[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(z, z, 0, 2, 4, 6, 8, 10, 12, 14) + __builtin_shufflevector(z, z, 1, 3, 5, 7, 9, 11, 13, 15);
}
// lane i = sum of all lanes of a[i], i < 4
static inline v4f transpose_sum4(const v16f* a) {
  const v16f x0 = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(a[0], a[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v16f x1 = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(a[2], a[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v16f y = __builtin_shufflevector(x0, x1, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                 __builtin_shufflevector(x0, x1, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const v8f z = __builtin_shufflevector(y, y, 0, 1, 4, 5, 8, 9, 12, 13) + __builtin_shufflevector(y, y, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(z, z, 0, 2, 4, 6) + __builtin_shufflevector(z, z, 1, 3, 5, 7);
}

template <int G>
constexpr int score_rows16() { return G <= 3 ? 8 : 4; }
static_assert(kTile % 8 == 0, "the AVX-512 score tiles store whole 8-row blocks");

// s[g][j0 + i] = scale * sum(acc[g][i]) for the whole R-row block (rows past n are overwritten or never read)
template <int G, int R>
static inline void store_block16(const v16f (*acc)[R], int j0, float scale, float (*s)[kTile]) {
  for (int g = 0; g < G; ++g) {
    if constexpr (R == 8) {
      const v8f r = transpose_sum8(acc[g]) * scale;
      std::memcpy(&s[g][j0], &r, sizeof(r));
    } else {
      const v4f r = transpose_sum4(acc[g]) * scale;
      std::memcpy(&s[g][j0], &r, sizeof(r));
    }
  }
}

template <typename T, int DC, int G>
static inline void tile_scores16(const float* q, const T* kb, int64_t k_st, const int64_t* tok, int n, float scale,
                                 float (*s)[kTile], int64_t pf, CrossRows<T> x) {
  constexpr int NC = DC / 16, R = score_rows16<G>();
  for (int j0 = 0; j0 < n; j0 += R) {
    const T* kr[R];
    block_rows<T, DC, R>(kb, k_st, tok, j0, n, pf, kr, x);
    v16f acc[G][R];
    for (int g = 0; g < G; ++g)
      for (int jj = 0; jj < R; ++jj) acc[g][jj] = v16f{};
    for (int c = 0; c < NC; ++c) {
      v16f qv[G];
      for (int g = 0; g < G; ++g) qv[g] = load16(q + g * DC + 16 * c);
      for (int jj = 0; jj < R; ++jj) {
        const v16f kv = load16(kr[jj] + 16 * c);
        for (int g = 0; g < G; ++g) acc[g][jj] += qv[g] * kv;
      }
    }
    store_block16<G, R>(acc, j0, scale, s);
  }
}

#endif

// the score tile of this build: tile_scores16 with AVX-512, the register-count-sized tile_scores otherwise
template <typename T, int DC, int G>
static inline void scores_tile(const float* q, const T* kb, int64_t k_st, const int64_t* tok, int n, float scale,
                               float (*s)[kTile], int64_t pf, CrossRows<T> x) {
#ifdef ACCEL_V16F_NATIVE
  tile_scores16<T, DC, G>(q, kb, k_st, tok, n, scale, s, pf, x);
#else
  tile_scores<vnf, T, DC, G>(q, kb, k_st, tok, n, scale, s, pf, x);
#endif
}

template <typename T, int DC>
static inline bool fast_tile(int G, bool values, const float* q, float* acc, const T* base, int64_t st,
                             const int64_t* tok, int n, float scale, float (*s)[kTile], int64_t pf, CrossRows<T> x) {
  if constexpr (DC > 0 && DC % kLanes == 0 && DC <= 256) {
    switch (G) {
#define ACCEL_TILE_CASE(GG)                                                          \
  case GG:                                                                           \
    if (values) tile_values<vnf, T, DC, GG>(acc, base, st, tok, n, s, pf, x);        \
    else scores_tile<T, DC, GG>(q, base, st, tok, n, scale, s, pf, x);              \
    return true;
      ACCEL_TILE_CASE(1)
      ACCEL_TILE_CASE(2)
      ACCEL_TILE_CASE(3)
      ACCEL_TILE_CASE(4)
#undef ACCEL_TILE_CASE
      default: return false;
    }
  }
  return false;
}

// ---- bf16 keys and values: the same tiles on even/odd lanes ----
// Widening a bf16 row element by element (zero-extend, shift: two operations per vector) made the bf16 tile
// compute-bound, slower per token than the fp32 one from half the bytes. Read as 32-bit words, 2n bf16 values are two
// fp32 vectors for one operation each (`word << 16`: the even-indexed values, `word & 0xffff0000`: the odd ones;
// linear.h does the same for weights). The group's queries are split once per span into even/odd halves to match
// (qs[g]: DC/2 even values, then DC/2 odd ones), and the value accumulators keep that split layout until the span
// ends (attend_span interleaves them back). Only the summation order differs from the widening tile.
template <typename V, int DC, int G>
static inline void tile_scores_split(const float* qs, const uint16_t* kb, int64_t k_st, const int64_t* tok, int n,
                                     float scale, float (*s)[kTile], int64_t pf) {
  using O = VecOps<V>;
  constexpr int NP = DC / (2 * O::n), H2 = DC / 2, R = score_rows<G>();
  for (int j0 = 0; j0 < n; j0 += R) {
    const uint16_t* kr[R];
    block_rows<uint16_t, DC, R>(kb, k_st, tok, j0, n, pf, kr);
    const int m = std::min(R, n - j0);
    V acc[G * R];
    for (int i = 0; i < G * R; ++i) acc[i] = V{};
    for (int c = 0; c < NP; ++c) {
      for (int half = 0; half < 2; ++half) {  // the even values, then the odd ones, of 2n per row
        V kv[R];
        for (int jj = 0; jj < R; ++jj) {
          V even, odd;  // the unused half is dead code the compiler drops
          O::load_even_odd(kr[jj] + 2 * O::n * c, even, odd);
          kv[jj] = half == 0 ? even : odd;
        }
        for (int g = 0; g < G; ++g) {
          const V qv = O::load(qs + g * DC + half * H2 + O::n * c);
          for (int jj = 0; jj < R; ++jj) acc[g * R + jj] += qv * kv[jj];
        }
      }
    }
    store_scores<V, G, R>(acc, j0, m, scale, s);
  }
}

template <typename V, int DC, int G>
static inline void tile_values_split(float* acc, const uint16_t* vb, int64_t v_st, const int64_t* tok, int n,
                                     const float (*p)[kTile], int64_t pf) {
  using O = VecOps<V>;
  constexpr int NP = DC / (2 * O::n), H2 = DC / 2;
  constexpr int CP = value_chunks<G, 2 * NP>() / 2 > 0 ? value_chunks<G, 2 * NP>() / 2 : 1;  // pairs per pass
  bool live[kTile];
  live_rows<G>(p, n, live);
  for (int c0 = 0; c0 < NP; c0 += CP) {
    V a[G][CP][2];
    for (int g = 0; g < G; ++g)
      for (int cp = 0; cp < CP; ++cp) {
        a[g][cp][0] = O::load(acc + g * DC + O::n * (c0 + cp));
        a[g][cp][1] = O::load(acc + g * DC + H2 + O::n * (c0 + cp));
      }
    for (int j = 0; j < n; ++j) {
      if (!live[j]) continue;
      if (c0 == 0) prefetch_row_ahead<uint16_t, DC>(vb + tok[j] * v_st, pf);
      V ve[CP], vo[CP];
      for (int cp = 0; cp < CP; ++cp) O::load_even_odd(vb + tok[j] * v_st + 2 * O::n * (c0 + cp), ve[cp], vo[cp]);
      for (int g = 0; g < G; ++g) {
        const V pv = O::splat(p[g][j]);
        for (int cp = 0; cp < CP; ++cp) {
          a[g][cp][0] += pv * ve[cp];
          a[g][cp][1] += pv * vo[cp];
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int cp = 0; cp < CP; ++cp) {
        std::memcpy(acc + g * DC + O::n * (c0 + cp), &a[g][cp][0], sizeof(V));
        std::memcpy(acc + g * DC + H2 + O::n * (c0 + cp), &a[g][cp][1], sizeof(V));
      }
  }
}

#if defined(ACCEL_V16F_NATIVE) && defined(__AVX512BF16__)
#define ACCEL_DECODE_BF16_DOT 1
// Scores of bf16 K rows against queries that hold bf16 values (a bf16 model's q, rounded to bf16 where transformers
// rounds it): vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes in one operation, half the multiply-adds of the
// even/odd tile, whose score and value passes together kept the bf16 span bound by the FMA units (about the DRAM rate
// with the data in cache). The products of two bf16 values are exact in fp32, so only the summation order differs
// from the even/odd tile (and denormal inputs, which bf16 keys and queries of a trained model do not hold, count as
// zero). qb: the group's queries as bf16 bits, DC per head; R K rows at a time against all G heads, as tile_scores.
template <int DC, int G>
static inline void tile_scores_dot(const uint16_t* qb, const uint16_t* kb, int64_t k_st, const int64_t* tok, int n,
                                   float scale, float (*s)[kTile], int64_t pf) {
  constexpr int NC = DC / 32, R = score_rows<G>();
  __m512bh qv[G][NC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512(qb + g * DC + 32 * c);
  for (int j0 = 0; j0 < n; j0 += R) {
    const uint16_t* kr[R];
    block_rows<uint16_t, DC, R>(kb, k_st, tok, j0, n, pf, kr);
    const int m = std::min(R, n - j0);
    __m512 acc[G * R];
    for (int i = 0; i < G * R; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < NC; ++c) {
      __m512bh kv[R];
      for (int jj = 0; jj < R; ++jj) kv[jj] = (__m512bh)_mm512_loadu_si512(kr[jj] + 32 * c);
      for (int g = 0; g < G; ++g)
        for (int jj = 0; jj < R; ++jj) acc[g * R + jj] = _mm512_dpbf16_ps(acc[g * R + jj], qv[g][c], kv[jj]);
    }
    v16f a[G * R];
    for (int i = 0; i < G * R; ++i) std::memcpy(&a[i], &acc[i], sizeof(v16f));
    store_scores<v16f, G, R>(a, j0, m, scale, s);
  }
}
#endif

// whether split_tile serves (T, DC, G): bf16 data, head_dim a multiple of two vectors, 1-4 query heads per KV head
template <typename T, int DC>
static inline bool has_split_tile(int G) {
  if constexpr (std::is_same<T, uint16_t>::value && DC > 0 && DC % (2 * kLanes) == 0 && DC <= 256) return G >= 1 && G <= 4;
  (void)G;
  return false;
}

// the split tile for (G, DC) of bf16 data; false: the span uses the widening tiles
// (qb: the group's queries as bf16 bits when they hold bf16 values and the CPU has vdpbf16ps, else nullptr: the
// score pass then takes tile_scores_dot)
template <typename T, int DC>
static inline bool split_tile(int G, bool values, const float* qs, float* acc, const T* base, int64_t st,
                              const int64_t* tok, int n, float scale, float (*s)[kTile], int64_t pf,
                              const uint16_t* qb = nullptr) {
  (void)qb;
  if constexpr (std::is_same<T, uint16_t>::value && DC > 0 && DC % (2 * kLanes) == 0 && DC <= 256) {
    switch (G) {
#ifdef ACCEL_DECODE_BF16_DOT
#define ACCEL_SCORES_DOT(GG) if (qb && DC % 32 == 0) tile_scores_dot<DC, GG>(qb, base, st, tok, n, scale, s, pf); else
#else
#define ACCEL_SCORES_DOT(GG)
#endif
#define ACCEL_SPLIT_CASE(GG)                                                   \
  case GG:                                                                     \
    if (values) tile_values_split<vnf, DC, GG>(acc, base, st, tok, n, s, pf);  \
    else ACCEL_SCORES_DOT(GG) tile_scores_split<vnf, DC, GG>(qs, base, st, tok, n, scale, s, pf); \
    return true;
      ACCEL_SPLIT_CASE(1)
      ACCEL_SPLIT_CASE(2)
      ACCEL_SPLIT_CASE(3)
      ACCEL_SPLIT_CASE(4)
#undef ACCEL_SPLIT_CASE
#undef ACCEL_SCORES_DOT
      default: return false;
    }
  }
  return false;
}

// Attend the query heads of (b, kh) over list positions [i0, i1). Writes the running max m[G],
// the softmax denominator l[G] and the unnormalised accumulator acc[G*D].
template <typename T, int DC>
static void attend_span(const DecodeParams& p, int b, int kh, int64_t i0, int64_t i1, float* m,
                        float* l, float* acc) {
  const int D = DC > 0 ? DC : p.D;
  const int G = p.H / p.Hkv;
  const float* q = p.q + (static_cast<int64_t>(b) * p.H + static_cast<int64_t>(kh) * G) * D;
  const int64_t row0 = p.offsets ? p.offsets[static_cast<int64_t>(b) * p.Hkv + kh] : 0;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh + row0 * p.k_st;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kh * p.v_sh + row0 * p.v_st;
  const int32_t* idx = p.indices ? p.indices + (static_cast<int64_t>(b) * p.Hkv + kh) * p.idx_stride : nullptr;
  const uint64_t* hmask =
      idx && p.head_mask ? p.head_mask + (static_cast<int64_t>(b) * p.Hkv + kh) * p.idx_stride : nullptr;
  const uint8_t* valid = p.valid ? p.valid + b * p.valid_sb : nullptr;

  const float ninf = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; ++g) {
    m[g] = ninf;
    l[g] = 0.f;
  }
  std::fill(acc, acc + static_cast<int64_t>(G) * D, 0.f);
  // bf16 K/V with a tile for (G, DC): even/odd-split queries and value accumulators (see split_tile)
  const bool split = has_split_tile<T, DC>(G);
  float qs[4 * 256];
  if (split)
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < D / 2; ++i) {
        qs[g * D + i] = q[g * D + 2 * i];
        qs[g * D + D / 2 + i] = q[g * D + 2 * i + 1];
      }
  // queries that hold bf16 values (every low half zero) as bf16 bits, for tile_scores_dot
  uint16_t qbits[4 * 256];
  const uint16_t* qb = nullptr;
#ifdef ACCEL_DECODE_BF16_DOT
  if (split && !ACCEL_DECODE_NO_BF16_DOT) {
    uint32_t low = 0;
    for (int i = 0; i < G * D; ++i) {
      uint32_t w;
      std::memcpy(&w, q + i, sizeof(w));
      low |= w & 0xFFFFu;
      qbits[i] = static_cast<uint16_t>(w >> 16);
    }
    if (low == 0) qb = qbits;
  }
#endif

  float s[kMaxGroup][kTile];
  int64_t tok[kTile];
  bool ok[kTile];
  const int64_t krow_bytes = static_cast<int64_t>(D) * sizeof(T);
  // Scattered (index-list) rows defeat the hardware prefetcher, so the kernel requests them itself:
  // K rows one tile ahead and V rows one tile ahead (before the current tile's value pass), so a
  // tile's worth of cache misses is in flight while a tile computes (memory-level parallelism instead
  // of one row's latency at a time). The first tile's rows are requested before the loop starts.
  // Contiguous rows are requested by the tiles themselves, row by row, kPfAheadBytes ahead (requests for a whole tile
  // at the tile's start, 16-256 rows ahead, measured slower on the AVX-512 machine). (Two tiles ahead measured no better, with 16-token tiles on AVX2; with
  // AVX-512's 64-token tiles, one tile is 64 rows ahead: the hylra and snapkv steps of decode_policies_smollm2_b1.csv
  // follow their bytes at 8K with it.)
  // Inside a run of consecutive indices (chunked selections, Quest's pages, sink and recent spans) only the first
  // max(kPfRun rows, kPfRunBytes) of it are requested: beyond that the hardware prefetcher follows the run, and
  // software requests only compete with it (a 512-row run read at 9.4 GB/s with every row requested, 18.5 GB/s
  // with only the run heads; indices are sorted and unique, so idx[j-n] == idx[j]-n means a run). Short runs are
  // requested whole: the prefetcher has not caught on before they end (28 layers x 3 KV heads of 63 random 16-token
  // pages of 8K, bf16, AVX-512 project machine, 2026-12-05, scratch harness: 5.7-7.9 GB/s with two rows of each page
  // requested, 12.0-12.8 GB/s with whole pages; a dense read of the same caches 31 GB/s).
  constexpr int kPfK = 1;
  constexpr int64_t kPfRun = ACCEL_DECODE_PF_RUN;
  constexpr int64_t kPfRunBytes = ACCEL_DECODE_PF_RUN_BYTES;
  const int64_t pf_run = std::max<int64_t>(kPfRun, kPfRunBytes / krow_bytes);
  auto in_run = [&](int64_t jj) { return jj >= pf_run && idx[jj - pf_run] == idx[jj] - pf_run; };
  auto prefetch_rows = [&](const T* base, int64_t st, int64_t a, int64_t e) {
    for (int64_t jj = a; jj < e; ++jj) {
      if (in_run(jj)) continue;
      const char* r = reinterpret_cast<const char*>(base + idx[jj] * st);
      for (int64_t off = 0; off < krow_bytes; off += 64) __builtin_prefetch(r + off, 0, ACCEL_PF_LOCALITY);
    }
  };
  // contiguous rows (no index list): each tile row requests the row kPfAheadBytes ahead of it (see kPfAheadBytes);
  // the distances are in elements, for the tiles' pointer arithmetic
  const int64_t pf_rows = std::max<int64_t>(1, kPfAheadBytes / krow_bytes);
  const int64_t pf_k = idx ? 0 : pf_rows * p.k_st, pf_v = idx ? 0 : pf_rows * p.v_st;
  // contiguous rows: the score pass requests V rows, the value pass the next tile's K rows (see kXPfBytes)
  const int64_t x_rows = kXPfBytes / krow_bytes;
  const CrossRows<T> x_scores{vb, p.v_st, idx || x_rows < 1 ? 0 : x_rows * p.v_st};
  const CrossRows<T> x_values{kb, p.k_st, idx || x_rows < 1 ? 0 : (kTile + x_rows) * p.k_st};
  // Index lists, default (ACCEL_DECODE_IDX_TOUCH): each tile's K and V rows are first read by a pass of one plain
  // load per cache line (touch_rows), so the tile's misses are all in flight together and its score and value passes
  // then find the rows in L1. On the AMD EPYC project machine the software requests above did not do that for
  // scattered rows: a Quest-like union (30 layers x 3 KV heads, ~1650 rows per KV head in 4-token pages, G = 3, fp32,
  // one thread, scratch harness, 2026-12-07) attended in 8.5-9.8 ms with the requests one tile ahead, the same with
  // them two tiles ahead, split in halves or left out, and with the cache on huge pages; in 5.1-5.5 ms with the touch
  // pass (a plain sum of the same rows: 3.0-3.7 ms; the tiles compute at 36 GB/s with the rows in cache).
  float touched = 0.f;
  auto touch_rows = [&](int64_t a, int64_t e) {
    float t = 0.f;
    for (int64_t jj = a; jj < e; ++jj)
      t += touch_row<T>(reinterpret_cast<const char*>(kb + idx[jj] * p.k_st), krow_bytes) +
           touch_row<T>(reinterpret_cast<const char*>(vb + idx[jj] * p.v_st), krow_bytes);
    touched += t;
    asm volatile("" : : "g"(touched));  // the loads are the point: keep them
  };
  constexpr bool kTouch = ACCEL_DECODE_IDX_TOUCH != 0;
  if (idx && !kTouch) {
    prefetch_rows(kb, p.k_st, i0, std::min<int64_t>(i1, i0 + kPfK * kTile));
    prefetch_rows(vb, p.v_st, i0, std::min<int64_t>(i1, i0 + kTile));
  }
  for (int64_t i = i0; i < i1; i += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, i1 - i));
    if (idx && kTouch) touch_rows(i, i + n);
    if (idx && !kTouch) {
      const int64_t a = i + kPfK * kTile;
      prefetch_rows(kb, p.k_st, std::min(a, i1), std::min<int64_t>(i1, a + kTile));
    }
    const int64_t pf0 = i + kTile, pf1 = idx && !kTouch ? std::min<int64_t>(i1, pf0 + kTile) : pf0;
    for (int j = 0; j < n; ++j) {
      const int64_t t = idx ? idx[i + j] : i + j;
      tok[j] = t;
      ok[j] = valid == nullptr || t >= p.valid_len || valid[t] != 0;
    }
    // scores: the group's queries are held in registers; the tile's K rows come from memory once
    // (first head) and from L1 for the other heads of the group
    if (split ? split_tile<T, DC>(G, false, qs, acc, kb, p.k_st, tok, n, p.scale, s, pf_k, qb)
              : fast_tile<T, DC>(G, false, q, acc, kb, p.k_st, tok, n, p.scale, s, pf_k, x_scores)) {
      for (int j = 0; j < n; ++j)
        if (!ok[j])
          for (int g = 0; g < G; ++g) s[g][j] = ninf;
    } else if constexpr (DC > 0 && DC % 16 == 0) {
      constexpr int NV = DC / 16;
      for (int g = 0; g < G; ++g) {
        v16f qv[NV];
        for (int c = 0; c < NV; ++c) qv[c] = load16(q + static_cast<int64_t>(g) * D + 16 * c);
        for (int j = 0; j < n; ++j) {
          if (!ok[j]) {
            s[g][j] = ninf;
            continue;
          }
          const T* kr = kb + tok[j] * p.k_st;
          v16f a = qv[0] * load16(kr);
          for (int c = 1; c < NV; ++c) a += qv[c] * load16(kr + 16 * c);
          s[g][j] = hsum16(a) * p.scale;
        }
      }
    } else {
      for (int j = 0; j < n; ++j) {
        if (!ok[j]) {
          for (int g = 0; g < G; ++g) s[g][j] = ninf;
          continue;
        }
        const T* kr = kb + tok[j] * p.k_st;
        for (int g = 0; g < G; ++g) {
          const float* qg = q + static_cast<int64_t>(g) * D;
          float dot = 0.f;
          for (int d = 0; d < D; ++d) dot += qg[d] * Load<T>::get(kr, d);
          s[g][j] = dot * p.scale;
        }
      }
    }
    if (hmask)  // entries another query head of the group selected: masked for this one
      for (int j = 0; j < n; ++j) {
        const uint64_t mk = hmask[i + j];
        for (int g = 0; g < G; ++g)
          if (!((mk >> g) & 1u)) s[g][j] = ninf;
      }
    if (p.scores) {
      float* sc = p.scores + (static_cast<int64_t>(b) * p.H + static_cast<int64_t>(kh) * G) * p.scores_stride;
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < n; ++j) sc[g * p.scores_stride + tok[j]] = s[g][j];
    }
    // online softmax update, once per tile
    for (int g = 0; g < G; ++g) {
      float mx = ninf;
#pragma omp simd reduction(max : mx)
      for (int j = 0; j < n; ++j) mx = s[g][j] > mx ? s[g][j] : mx;
      if (mx == ninf) {
        for (int j = 0; j < n; ++j) s[g][j] = 0.f;
        continue;
      }
      const float newm = std::max(m[g], mx);
      if (newm > m[g]) {
        const float alpha = (m[g] == ninf) ? 0.f : fast_exp(m[g] - newm);
        l[g] *= alpha;
        float* a = acc + static_cast<int64_t>(g) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) a[d] *= alpha;
        m[g] = newm;
      }
      float sum = 0.f;
      int j = 0;
      if (n >= 16) {
        v16f es{};
        for (; j + 16 <= n; j += 16) {
          const v16f e = fast_exp16(load16(s[g] + j) - splat16(newm));  // -inf (masked) lanes give exactly 0
          store16(s[g] + j, e);
          es += e;
        }
        sum = hsum16(es);
      }
      for (; j < n; ++j) {
        const float e = fast_exp(s[g][j] - newm);
        const float pj = (s[g][j] == ninf) ? 0.f : e;
        s[g][j] = pj;
        sum += pj;
      }
      l[g] += sum;
    }
    for (int64_t jj = pf0; jj < pf1; ++jj) {
      if (in_run(jj)) continue;
      const char* vr = reinterpret_cast<const char*>(vb + idx[jj] * p.v_st);
      for (int64_t off = 0; off < krow_bytes; off += 64) __builtin_prefetch(vr + off, 0, ACCEL_PF_LOCALITY);
    }
    // values: the accumulator of one head stays in registers across the tile
    if (split ? split_tile<T, DC>(G, true, qs, acc, vb, p.v_st, tok, n, p.scale, s, pf_v)
              : fast_tile<T, DC>(G, true, q, acc, vb, p.v_st, tok, n, p.scale, s, pf_v, x_values)) {
    } else if constexpr (DC > 0 && DC % 16 == 0) {
      constexpr int NV = DC / 16;
      for (int g = 0; g < G; ++g) {
        float* ag = acc + static_cast<int64_t>(g) * D;
        v16f a[NV];
        for (int c = 0; c < NV; ++c) a[c] = load16(ag + 16 * c);
        for (int j = 0; j < n; ++j) {
          const float pj = s[g][j];
          if (pj == 0.f) continue;
          const T* vr = vb + tok[j] * p.v_st;
          const v16f pv = splat16(pj);
          for (int c = 0; c < NV; ++c) a[c] += pv * load16(vr + 16 * c);
        }
        for (int c = 0; c < NV; ++c) store16(ag + 16 * c, a[c]);
      }
    } else {
      for (int j = 0; j < n; ++j) {
        if (!ok[j]) continue;
        const T* vr = vb + tok[j] * p.v_st;
        for (int g = 0; g < G; ++g) {
          const float pj = s[g][j];
          float* a = acc + static_cast<int64_t>(g) * D;
          for (int d = 0; d < D; ++d) a[d] += pj * Load<T>::get(vr, d);
        }
      }
    }
  }
  if (split) {  // the split value accumulators back to head order
    float tmp[256];
    for (int g = 0; g < G; ++g) {
      float* a = acc + static_cast<int64_t>(g) * D;
      for (int i = 0; i < D / 2; ++i) {
        tmp[2 * i] = a[i];
        tmp[2 * i + 1] = a[D / 2 + i];
      }
      std::memcpy(a, tmp, sizeof(float) * D);
    }
  }
}

// the shortest piece of a head's rows decode_attention_impl splits off to share a batch's heads evenly over threads
constexpr int64_t kMinSplitRows = 256;

template <typename T, int DC>
static void decode_attention_impl(const DecodeParams& p) {
  const int D = DC > 0 ? DC : p.D;
  const int G = p.H / p.Hkv;
  const int64_t BH = static_cast<int64_t>(p.B) * p.Hkv;
  int64_t max_len = 0;
  for (int64_t i = 0; i < BH; ++i) max_len = std::max<int64_t>(max_len, p.lengths[i]);

  int threads = 1;
#ifdef _OPENMP
  threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#endif
  // Split the token axis when there are fewer (b, kv-head) items than ~4 per thread, into a count of items the
  // threads share evenly where the pieces can stay at least kMinSplitRows long: 3 KV heads in 3 pieces each on 2
  // threads leave one thread a fifth piece while the other waits (batch 1 of SmolLM2); 4 pieces each do not.
  int64_t splits = 1;
  if (threads > 1 && BH < 4 * threads) {
    splits = std::max<int64_t>(1, std::min<int64_t>((4 * threads + BH - 1) / BH, max_len / 512));
    int64_t even = splits;
    while ((BH * even) % threads != 0 && max_len / (even + 1) >= kMinSplitRows) ++even;
    if ((BH * even) % threads == 0) splits = even;
  }
  const int64_t chunk = splits > 1 ? (max_len + splits - 1) / splits : std::max<int64_t>(max_len, 1);
  const int64_t items = BH * splits;
  std::vector<float> pm(items * G), pl(items * G), pacc(items * G * static_cast<int64_t>(D));

  // longest items first (heads keep different numbers of rows under per-head KV budgets: a long head taken last
  // would leave the other threads waiting); each item's result and the merge below do not depend on the order
  std::vector<int64_t> order(static_cast<size_t>(items));
  for (int64_t it = 0; it < items; ++it) order[it] = it;
  if (threads > 1 && items > 1) {
    auto rows_of = [&](int64_t it) {
      const int64_t len = p.lengths[it / splits], sp = it % splits;
      return std::min(len, (sp + 1) * chunk) - std::min(len, sp * chunk);
    };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rows_of(a) > rows_of(b); });
  }

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
  for (int64_t oi = 0; oi < items; ++oi) {
    const int64_t it = order[oi];
    const int64_t bh = it / splits, sp = it % splits;
    const int b = static_cast<int>(bh / p.Hkv), kh = static_cast<int>(bh % p.Hkv);
    const int64_t len = p.lengths[bh];
    const int64_t i0 = std::min(len, sp * chunk), i1 = std::min(len, (sp + 1) * chunk);
    attend_span<T, DC>(p, b, kh, i0, i1, pm.data() + it * G, pl.data() + it * G,
                       pacc.data() + it * G * static_cast<int64_t>(D));
  }

  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int b = static_cast<int>(bh / p.Hkv), kh = static_cast<int>(bh % p.Hkv);
    for (int g = 0; g < G; ++g) {
      const int64_t head = static_cast<int64_t>(b) * p.H + static_cast<int64_t>(kh) * G + g;
      float M = ninf;
      for (int64_t sp = 0; sp < splits; ++sp) M = std::max(M, pm[(bh * splits + sp) * G + g]);
      float* o = p.out + head * D;
      std::fill(o, o + D, 0.f);
      float L = 0.f;
      if (M != ninf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t it = bh * splits + sp;
          const float mi = pm[it * G + g];
          if (mi == ninf) continue;
          const float w = std::exp(mi - M);
          L += w * pl[it * G + g];
          const float* a = pacc.data() + (it * G + g) * D;
          for (int d = 0; d < D; ++d) o[d] += w * a[d];
        }
        const float inv = 1.f / L;
        for (int d = 0; d < D; ++d) o[d] *= inv;
      }
      if (p.lse) p.lse[head] = (M == ninf) ? ninf : M + std::log(L);
    }
  }
}

template <typename T>
inline void decode_attention(const DecodeParams& p) {
  switch (p.D) {
    case 64: decode_attention_impl<T, 64>(p); break;
    case 80: decode_attention_impl<T, 80>(p); break;
    case 96: decode_attention_impl<T, 96>(p); break;
    case 128: decode_attention_impl<T, 128>(p); break;
    case 256: decode_attention_impl<T, 256>(p); break;
    default: decode_attention_impl<T, 0>(p); break;
  }
}

}  // namespace cpu
}  // namespace accel
