// CUDA decode attention over accel's KV cache: the GPU twin of accel/cpu/decode_attention.h.
// Torch-free (raw pointers + strides) so that nvcc compile-checks it in seconds.
//
// One thread block per (b, query head h, split). Phase 1: each thread scores one token of a
// 128-token tile (q in shared memory, fp32). Phase 2: block max / sum for the online softmax.
// Phase 3: threads stride over the head dimension and accumulate sum_t p_t * v[t][d].
// Writes a normalised partial output and its log-sum-exp per split; a second kernel merges splits.
// Written for A100/H100; compile-checked with nvcc here, not executed (no GPU in CI).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace accel {
namespace cuda {

constexpr int kThreads = 128;

struct DecodeArgs {
  const float* q;  // [B, H, D]
  const void* k;
  const void* v;
  int64_t k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  const int32_t* lengths;  // [B*Hkv]
  const int64_t* offsets;  // [B*Hkv] or null: ragged row pool, head bh starts at row offsets[bh]
  const int32_t* indices;  // [B*Hkv*idx_stride] or null
  int64_t idx_stride;
  const uint8_t* valid;  // [B*valid_sb] or null
  int64_t valid_sb, valid_len;
  float scale;
  float* o_part;    // [B*H*splits, D]
  float* lse_part;  // [B*H*splits]
  int B, H, Hkv, D, splits, chunk;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float block_reduce_max(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, red[w]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_reduce_sum(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) r += red[w];
  __syncthreads();
  return r;
}

// dynamic shared memory: q[D] + acc[D] + p[kThreads] + tok[kThreads] (int) + red[32]
template <typename T>
__global__ void decode_attention_kernel(DecodeArgs a) {
  extern __shared__ float smem[];
  float* qs = smem;
  float* acc = qs + a.D;
  float* ps = acc + a.D;
  int* toks = reinterpret_cast<int*>(ps + kThreads);
  float* red = reinterpret_cast<float*>(toks + kThreads);

  const int head = blockIdx.x;  // b*H + h
  const int sp = blockIdx.y;
  const int b = head / a.H, h = head % a.H;
  const int G = a.H / a.Hkv, kh = h / G;
  const int64_t bh = static_cast<int64_t>(b) * a.Hkv + kh;
  const int len = a.lengths[bh];
  const int i0 = min(len, sp * a.chunk), i1 = min(len, (sp + 1) * a.chunk);
  const int64_t row0 = a.offsets ? a.offsets[bh] : 0;
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + kh * a.k_sh + row0 * a.k_st;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + kh * a.v_sh + row0 * a.v_st;

  for (int d = threadIdx.x; d < a.D; d += kThreads) {
    qs[d] = a.q[static_cast<int64_t>(head) * a.D + d];
    acc[d] = 0.f;
  }
  __syncthreads();
  float m = -INFINITY, l = 0.f;
  for (int base = i0; base < i1; base += kThreads) {
    const int i = base + threadIdx.x;
    float s = -INFINITY;
    int t = 0;
    if (i < i1) {
      t = a.indices ? a.indices[bh * a.idx_stride + i] : i;
      bool ok = a.valid == nullptr || t >= a.valid_len || a.valid[b * a.valid_sb + t] != 0;
      if (ok) {
        const T* kr = kb + static_cast<int64_t>(t) * a.k_st;
        float dot = 0.f;
        for (int d = 0; d < a.D; ++d) dot += qs[d] * to_f(kr[d]);
        s = dot * a.scale;
      }
    }
    toks[threadIdx.x] = t;
    const float tile_max = block_reduce_max(s, red);
    const float new_m = fmaxf(m, tile_max);
    const float safe_m = new_m == -INFINITY ? 0.f : new_m;
    const float p = s == -INFINITY ? 0.f : __expf(s - safe_m);
    ps[threadIdx.x] = p;
    const float alpha = m == -INFINITY ? 0.f : __expf(m - safe_m);
    const float tile_sum = block_reduce_sum(p, red);
    l = l * alpha + tile_sum;
    m = new_m;
    const int n = min(kThreads, i1 - base);
    for (int d = threadIdx.x; d < a.D; d += kThreads) {
      float x = acc[d] * alpha;
      for (int j = 0; j < n; ++j) {
        if (ps[j] != 0.f) x += ps[j] * to_f(vb[static_cast<int64_t>(toks[j]) * a.v_st + d]);
      }
      acc[d] = x;
    }
    __syncthreads();
  }
  const int64_t row = static_cast<int64_t>(head) * a.splits + sp;
  for (int d = threadIdx.x; d < a.D; d += kThreads) a.o_part[row * a.D + d] = l > 0.f ? acc[d] / l : 0.f;
  if (threadIdx.x == 0) a.lse_part[row] = l > 0.f ? m + logf(l) : -INFINITY;
}

// Merge the splits of each head: out = sum_s exp(lse_s - LSE) * o_s.
__global__ void merge_splits_kernel(const float* o_part, const float* lse_part, float* out, float* lse, int D,
                                    int splits) {
  const int64_t head = blockIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, lse_part[head * splits + s]);
  float L = 0.f;
  if (M != -INFINITY)
    for (int s = 0; s < splits; ++s) L += __expf(lse_part[head * splits + s] - M);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float x = 0.f;
    if (M != -INFINITY)
      for (int s = 0; s < splits; ++s)
        x += __expf(lse_part[head * splits + s] - M) / L * o_part[(head * splits + s) * D + d];
    out[head * D + d] = x;
  }
  if (threadIdx.x == 0 && lse) lse[head] = M == -INFINITY ? -INFINITY : M + logf(L);
}

inline size_t decode_smem_bytes(int D) {
  return sizeof(float) * (2 * D + kThreads) + sizeof(int) * kThreads + sizeof(float) * 32;
}

template <typename T>
inline void launch_decode_attention(const DecodeArgs& a, float* out, float* lse, cudaStream_t stream) {
  dim3 grid(a.B * a.H, a.splits);
  decode_attention_kernel<T><<<grid, kThreads, decode_smem_bytes(a.D), stream>>>(a);
  merge_splits_kernel<<<a.B * a.H, 64, 0, stream>>>(a.o_part, a.lse_part, out, lse, a.D, a.splits);
}

}  // namespace cuda
}  // namespace accel
