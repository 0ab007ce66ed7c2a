// Small branch-free math helpers written so that GCC/Clang auto-vectorise them
// inside `#pragma omp simd` loops (-O3 -march=native). Torch-free.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Temporal locality of the software prefetches of scattered rows (index lists, HiP's representatives): 3 requests
// them into every cache level (prefetcht0), 0 outside the L2 and L3 (prefetchnta). On the Intel Xeon project machine
// (2026-12-06, a scratch harness reading 1 KB rows at sorted random positions of a 1.4 GB buffer, one core) rows
// requested with prefetchnta read at 4.6-6.1 GB/s, with prefetcht0 at 9.4-9.9 GB/s, with no request at 9.4 GB/s
// (a sequential read 14.6 GB/s): the non-temporal hint costs half the rate there. Settable for such comparisons.
#ifndef ACCEL_PF_LOCALITY
#define ACCEL_PF_LOCALITY 3
#endif

namespace accel {
namespace cpu {

// exp(x) for x <= 0 (softmax after max subtraction), relative error ~2e-7.
// Cody-Waite range reduction x = n*ln2 + r, |r| <= ln2/2, degree-6 minimax-style
// Taylor polynomial for e^r, then scale by 2^n through the exponent bits.
static inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;                 // avoid denormals; e^-87 ~ 1.6e-38
  const float log2e = 1.44269504088896341f;
  float n = __builtin_floorf(x * log2e + 0.5f);
  float r = x - n * 0.693145751953125f;        // ln2 hi
  r = r - n * 1.428606765330187045e-06f;       // ln2 lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(float));
  return p * scale;
}

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

// IEEE half precision (fp16) storage: its own type, so that the kernels' overloads tell it from bfloat16's uint16_t
struct f16 {
  uint16_t bits;
};
static_assert(sizeof(f16) == 2, "f16 must be two bytes");

// fp16 -> fp32, exact for every value (normals, subnormals, zeros, infinities, NaNs)
static inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu, bits;
  if (e == 0x1fu) {
    bits = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal: m * 2^-24, normalised
    uint32_t s = 0;
    while ((m & 0x400u) == 0) {
      m <<= 1;
      ++s;
    }
    bits = sign | ((113u - s) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

template <typename T> struct Load;
template <> struct Load<float> {
  static inline float get(const float* p, int64_t i) { return p[i]; }
};
template <> struct Load<uint16_t> {  // bfloat16 storage
  static inline float get(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
};
template <> struct Load<f16> {
  static inline float get(const f16* p, int64_t i) { return f16_to_float(p[i].bits); }
};

// A touch of one row of `bytes` bytes: one plain load per cache line from its start, and its last element (the last
// line of a row that does not start on one), summed as floats so the caller can keep the loads (an empty asm on the
// sum). A pass of these over a tile of scattered rows puts the tile's misses in flight together; on the AMD EPYC
// project machine software prefetches did not (decode_attention.h's index lists, hip.h's representative rows).
template <typename T>
static inline float touch_row(const char* row, int64_t bytes) {
  float t = 0.f;
  T x;
  for (int64_t o = 0; o < bytes; o += 64) {
    std::memcpy(&x, row + o, sizeof(T));
    t += Load<T>::get(&x, 0);
  }
  std::memcpy(&x, row + bytes - sizeof(T), sizeof(T));
  return t + Load<T>::get(&x, 0);
}

// 16-lane fp32 vector. With AVX-512 it is one GCC/Clang vector-extension type (one zmm). Without it, GCC
// lowers a 64-byte vector-extension type through memory (measured on an AVX2-only EPYC: a GEMV at 4.6 GB/s
// against 18 GB/s with 8-lane vectors), so there it is a pair of native 8-lane vectors (two ymm on AVX2)
// with the same operators. Kernels use only what both forms provide: + - * (vector or scalar operand),
// += -= *=, v16f{} (zeros), load16 / store16 / splat16, vmax16, hsum16 / hmax16, fast_exp16, and lane
// reads v[i]. Loads are unaligned memcpy's, which compile to plain vector loads.
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

// exp of every lane of a native vector VF (int lanes VI) for x <= 0 after max subtraction; -inf lanes give
// exactly 0. Same range reduction and polynomial as fast_exp, written in vector-extension ops so it is one
// straight vector sequence (the scalar version does not auto-vectorise inside loops with GCC 12).
template <typename VF, typename VI>
static inline VF fast_exp_vec(VF x) {
  const VF lo = VF{} + -87.0f;
  const VI neg_inf = x == (VF{} - __builtin_inff());
  x = x < lo ? lo : x;
  const VF magic = VF{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const VF n = (x * 1.44269504088896341f + magic) - magic;
  VF r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  VF p = VF{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &e, sizeof(scale));
  VF out = p * scale;
  VI bits;
  std::memcpy(&bits, &out, sizeof(bits));
  bits = bits & ~neg_inf;  // exact 0 for masked (-inf) lanes
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

static inline float hsum8(v8f a) {
  v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b = b + __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b = b + __builtin_shufflevector(b, b, 1, 0, 3, 2);
  return b[0];
}
static inline float hmax8(v8f a) {  // tree reduction (3 shuffle+max levels)
  v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3);
  v4f c = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b = b > c ? b : c;
  c = __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b = b > c ? b : c;
  c = __builtin_shufflevector(b, b, 1, 0, 3, 2);
  b = b > c ? b : c;
  return b[0];
}

// 8-lane loads (unaligned memcpy's compile to plain vector loads): fp32, and bfloat16 widened to fp32 by shifting
static inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
static inline v8f load8_bf16(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  const v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f r;
  std::memcpy(&r, &u, sizeof(r));
  return r;
}
static inline v8f load8(const uint16_t* p) { return load8_bf16(p); }
// fp16 widened by the F16C conversion where the build has it (every AVX2 and AVX-512 CPU), element by element otherwise
static inline v8f load8_f16(const f16* p) {
#if defined(__F16C__)
  __m128i h;
  std::memcpy(&h, p, sizeof(h));
  const __m256 f = _mm256_cvtph_ps(h);
  v8f r;
  std::memcpy(&r, &f, sizeof(r));
  return r;
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = f16_to_float(p[i].bits);
  return r;
#endif
}
static inline v8f load8(const f16* p) { return load8_f16(p); }
static inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
// 16 bfloat16 values read as eight 32-bit words: `word << 16` is the even-indexed values as fp32, `word & 0xffff0000`
// the odd-indexed ones (one operation per 8 values instead of widening each: the GEMV and decode-attention tiles)
static inline void load16_bf16_even_odd(const uint16_t* p, v8f& even, v8f& odd) {
  v8u u;
  std::memcpy(&u, p, sizeof(u));
  const v8u e = u << 16, o = u & 0xffff0000u;
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

#if defined(__AVX512F__) && !defined(ACCEL_VEC_PAIR)
#define ACCEL_V16F_NATIVE 1
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

static inline v16f load16(const float* p) {
  v16f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
static inline v16f load16(const uint16_t* p) {  // bfloat16 -> fp32 by widening and shifting
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f r;
  std::memcpy(&r, &u, sizeof(r));
  return r;
}
static inline v16f load16(const f16* p) {  // fp16 -> fp32 (vcvtph2ps)
  __m256i h;
  std::memcpy(&h, p, sizeof(h));
  const __m512 f = _mm512_cvtph_ps(h);
  v16f r;
  std::memcpy(&r, &f, sizeof(r));
  return r;
}
static inline v16f fast_exp16(v16f x) { return fast_exp_vec<v16f, v16i>(x); }
static inline v16f vmax16(v16f a, v16f b) { return a > b ? a : b; }
static inline float hsum16(v16f v) {
  return hsum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
static inline float hmax16(v16f v) {
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return hmax8(a > b ? a : b);
}
#else
struct v16f {
  v8f lo, hi;
  inline float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
  inline v16f& operator+=(const v16f& o) { lo += o.lo; hi += o.hi; return *this; }
  inline v16f& operator-=(const v16f& o) { lo -= o.lo; hi -= o.hi; return *this; }
  inline v16f& operator*=(const v16f& o) { lo *= o.lo; hi *= o.hi; return *this; }
  inline v16f& operator*=(float s) { lo *= s; hi *= s; return *this; }
};
static_assert(sizeof(v16f) == 64, "v16f must be 16 packed floats");
static inline v16f operator+(v16f a, const v16f& b) { return a += b; }
static inline v16f operator-(v16f a, const v16f& b) { return a -= b; }
static inline v16f operator*(v16f a, const v16f& b) { return a *= b; }
static inline v16f operator+(const v16f& a, float s) { return v16f{a.lo + s, a.hi + s}; }
static inline v16f operator-(const v16f& a, float s) { return v16f{a.lo - s, a.hi - s}; }
static inline v16f operator*(const v16f& a, float s) { return v16f{a.lo * s, a.hi * s}; }
static inline v16f operator+(float s, const v16f& a) { return a + s; }
static inline v16f operator*(float s, const v16f& a) { return a * s; }
static inline v16f operator-(float s, const v16f& a) { return v16f{s - a.lo, s - a.hi}; }

static inline v16f load16(const float* p) {
  v16f r;
  std::memcpy(&r.lo, p, sizeof(v8f));
  std::memcpy(&r.hi, p + 8, sizeof(v8f));
  return r;
}
static inline v16f load16(const uint16_t* p) { return v16f{load8_bf16(p), load8_bf16(p + 8)}; }
static inline v16f load16(const f16* p) { return v16f{load8_f16(p), load8_f16(p + 8)}; }
static inline v16f fast_exp16(v16f x) { return v16f{fast_exp_vec<v8f, v8i>(x.lo), fast_exp_vec<v8f, v8i>(x.hi)}; }
static inline v16f vmax16(v16f a, v16f b) { return v16f{a.lo > b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi}; }
static inline float hsum16(v16f v) { return hsum8(v.lo + v.hi); }
static inline float hmax16(v16f v) { return hmax8(v.lo > v.hi ? v.lo : v.hi); }
#endif

static inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
static inline v16f splat16(float x) { return v16f{} + x; }

// Lane k of the result = sum of the 16 lanes of v[k]: a transpose-and-add network (15 adds, 30 shuffles)
// instead of 16 separate horizontal sums.
#ifdef ACCEL_V16F_NATIVE
static inline v16f reduce16x16(const v16f* v) {
  v16f w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
// v16f as two 8-lane halves (no AVX-512): lane k = sum of v[k]'s lanes, one horizontal sum each.
static inline v16f reduce16x16(const v16f* v) {
  float out[16];
  for (int k = 0; k < 16; ++k) out[k] = hsum16(v[k]);
  return load16(out);
}
#endif

// [sum(a), sum(b), sum(c), sum(d)] of four 8-lane vectors (one reduction tree for four sums)
static inline v4f hsum8x4(v8f a, v8f b, v8f c, v8f d) {
  const v4f a4 = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4f b4 = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
  const v4f c4 = __builtin_shufflevector(c, c, 0, 1, 2, 3) + __builtin_shufflevector(c, c, 4, 5, 6, 7);
  const v4f d4 = __builtin_shufflevector(d, d, 0, 1, 2, 3) + __builtin_shufflevector(d, d, 4, 5, 6, 7);
  const v4f ab = __builtin_shufflevector(a4, b4, 0, 1, 4, 5) + __builtin_shufflevector(a4, b4, 2, 3, 6, 7);
  const v4f cd = __builtin_shufflevector(c4, d4, 0, 1, 4, 5) + __builtin_shufflevector(c4, d4, 2, 3, 6, 7);
  return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) + __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
}

// ---- the native vector: one register's worth (16 lanes with AVX-512, 8 without) ----
// The register-blocked tiles (decode attention, the GEMV blocks) are written once over `VecOps<V>` and instantiated
// with the native vector `vnf`, their block sizes chosen from the register count `kVecRegs` (16 ymm on AVX2; 32 zmm
// with AVX-512).
template <typename V> struct VecOps;
template <> struct VecOps<v8f> {
  static constexpr int n = 8;
  static inline v8f load(const float* p) { return load8(p); }
  static inline v8f load(const uint16_t* p) { return load8_bf16(p); }
  static inline v8f load(const f16* p) { return load8_f16(p); }
  static inline v8f splat(float x) { return splat8(x); }
  static inline float hsum(v8f v) { return hsum8(v); }
  static inline v4f hsum4(v8f a, v8f b, v8f c, v8f d) { return hsum8x4(a, b, c, d); }
  // 2n bf16 values as the even-indexed and the odd-indexed n (see load16_bf16_even_odd)
  static inline void load_even_odd(const uint16_t* p, v8f& even, v8f& odd) { load16_bf16_even_odd(p, even, odd); }
};
// v16f in both of its forms (one zmm, or a pair of ymm without AVX-512: the 16-lane blocks of the GEMV); the
// reductions across lanes and the even/odd bf16 load only where it is the native vector
template <> struct VecOps<v16f> {
  static constexpr int n = 16;
  static inline v16f load(const float* p) { return load16(p); }
  static inline v16f load(const uint16_t* p) { return load16(p); }
  static inline v16f load(const f16* p) { return load16(p); }
  static inline v16f splat(float x) { return splat16(x); }
  static inline float hsum(const v16f& v) { return hsum16(v); }
#ifdef ACCEL_V16F_NATIVE
  static inline v8f fold(v16f v) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static inline v4f hsum4(v16f a, v16f b, v16f c, v16f d) { return hsum8x4(fold(a), fold(b), fold(c), fold(d)); }
  static inline void load_even_odd(const uint16_t* p, v16f& even, v16f& odd) {
    v16u u;
    std::memcpy(&u, p, sizeof(u));
    const v16u e = u << 16, o = u & 0xffff0000u;
    std::memcpy(&even, &e, sizeof(even));
    std::memcpy(&odd, &o, sizeof(odd));
  }
#endif
};
#ifdef ACCEL_V16F_NATIVE
typedef v16f vnf;
constexpr int kVecRegs = 32;
#else
typedef v8f vnf;
constexpr int kVecRegs = 16;
#endif
constexpr int kLanes = VecOps<vnf>::n;

}  // namespace cpu
}  // namespace accel
