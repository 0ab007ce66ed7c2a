// Small branch-free math helpers written so that GCC/Clang auto-vectorise them
// inside `#pragma omp simd` loops (-O3 -march=native). Torch-free.
#pragma once
#include <cstdint>
#include <cstring>

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

template <typename T> struct Load;
template <> struct Load<float> {
  static inline float get(const float* p, int64_t i) { return p[i]; }
};
template <> struct Load<uint16_t> {  // bfloat16 storage
  static inline float get(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
};

// 16-lane fp32 vector via GCC/Clang vector extensions: one zmm on AVX-512, two ymm on AVX2,
// scalarised elsewhere. Loads are unaligned memcpy's, which compile to plain vector loads.
typedef float v16f __attribute__((vector_size(64)));
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
static inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
static inline v16f splat16(float x) { return v16f{} + x; }
typedef int32_t v16i __attribute__((vector_size(64)));

// exp of 16 lanes (x <= 0 after max subtraction; -inf lanes give 0): same range reduction and
// polynomial as fast_exp, written in vector-extension ops so it is one straight vector sequence
// (the scalar version does not auto-vectorise inside loops with GCC 12).
static inline v16f fast_exp16(v16f x) {
  const v16f lo = splat16(-87.0f);
  const v16i neg_inf = x == splat16(-__builtin_inff());
  x = x < lo ? lo : x;
  const v16f magic = splat16(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v16f n = (x * 1.44269504088896341f + magic) - magic;
  v16f r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  v16f p = splat16(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  v16f out = p * scale;
  v16i bits;
  std::memcpy(&bits, &out, sizeof(bits));
  bits = bits & ~neg_inf;  // exact 0 for masked (-inf) lanes
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
// Tree reduction (4 shuffle+add levels) instead of 16 dependent scalar adds.
static inline float hmax16(v16f v) {
  v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  v8f b8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  a = a > b8 ? a : b8;
  v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3);
  v4f c = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b = b > c ? b : c;
  c = __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b = b > c ? b : c;
  c = __builtin_shufflevector(b, b, 1, 0, 3, 2);
  b = b > c ? b : c;
  return b[0];
}
static inline v16f vmax16(v16f a, v16f b) { return a > b ? a : b; }
static inline float hsum16(v16f v) {
  v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b = b + __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b = b + __builtin_shufflevector(b, b, 1, 0, 3, 2);
  return b[0];
}

}  // namespace cpu
}  // namespace accel
