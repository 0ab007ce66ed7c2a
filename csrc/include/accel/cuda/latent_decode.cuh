// CUDA latent (MLA / TPLA-shard) decode attention: the GPU twin of accel/cpu/latent_decode.h.
// Torch-free (raw pointers + strides) so that nvcc compile-checks it in seconds.
//
// Row t of sequence b is [c_t (Dl) | k^R_t (Dr)]; every head uses the whole row as its key and c_t as its
// value. One thread block per (b, head, split): phase 1 scores one row per thread (q in shared memory),
// phase 2 block max / sum for the online softmax, phase 3 threads stride over the Dl latent channels and
// accumulate sum_t p_t c_t[d]. Splits are merged by the decode kernel's merge_splits_kernel.
// Written for A100/H100; compile-checked with nvcc here, not executed (no GPU in CI).
#pragma once
#include "accel/cuda/decode_attention.cuh"

namespace accel {
namespace cuda {

struct LatentArgs {
  const float* q;  // [B, H, Dl + Dr]
  const void* kv;  // element (b, t, d) at b*kv_sb + t*kv_st + d
  int64_t kv_sb, kv_st;
  const int32_t* lengths;  // [B]
  const int32_t* indices;  // [B*idx_stride] or null
  int64_t idx_stride;
  const uint8_t* valid;  // [B*valid_sb] or null
  int64_t valid_sb;
  float scale;
  float* o_part;    // [B*H*splits, Dl]
  float* lse_part;  // [B*H*splits]
  int B, H, Dl, Dr, splits, chunk;
};

// dynamic shared memory: q[Dl+Dr] + acc[Dl] + p[kThreads] + tok[kThreads] (int) + red[32]
template <typename T>
__global__ void latent_decode_kernel(LatentArgs a) {
  extern __shared__ float smem[];
  const int Dk = a.Dl + a.Dr;
  float* qs = smem;
  float* acc = qs + Dk;
  float* ps = acc + a.Dl;
  int* toks = reinterpret_cast<int*>(ps + kThreads);
  float* red = reinterpret_cast<float*>(toks + kThreads);

  const int head = blockIdx.x;  // b*H + h
  const int sp = blockIdx.y;
  const int b = head / a.H;
  const int len = a.lengths[b];
  const int i0 = min(len, sp * a.chunk), i1 = min(len, (sp + 1) * a.chunk);
  const T* rows = static_cast<const T*>(a.kv) + b * a.kv_sb;

  for (int d = threadIdx.x; d < Dk; d += kThreads) qs[d] = a.q[static_cast<int64_t>(head) * Dk + d];
  for (int d = threadIdx.x; d < a.Dl; d += kThreads) acc[d] = 0.f;
  __syncthreads();
  float m = -INFINITY, l = 0.f;
  for (int base = i0; base < i1; base += kThreads) {
    const int i = base + threadIdx.x;
    float s = -INFINITY;
    int t = 0;
    if (i < i1) {
      t = a.indices ? a.indices[static_cast<int64_t>(b) * a.idx_stride + i] : i;
      if (a.valid == nullptr || a.valid[b * a.valid_sb + t] != 0) {
        const T* r = rows + static_cast<int64_t>(t) * a.kv_st;
        float dot = 0.f;
        for (int d = 0; d < Dk; ++d) dot += qs[d] * to_f(r[d]);
        s = dot * a.scale;
      }
    }
    toks[threadIdx.x] = t;
    const float new_m = fmaxf(m, block_reduce_max(s, red));
    const float safe_m = new_m == -INFINITY ? 0.f : new_m;
    const float p = s == -INFINITY ? 0.f : __expf(s - safe_m);
    ps[threadIdx.x] = p;
    const float alpha = m == -INFINITY ? 0.f : __expf(m - safe_m);
    l = l * alpha + block_reduce_sum(p, red);
    m = new_m;
    const int n = min(kThreads, i1 - base);
    for (int d = threadIdx.x; d < a.Dl; d += kThreads) {
      float x = acc[d] * alpha;
      for (int j = 0; j < n; ++j)
        if (ps[j] != 0.f) x += ps[j] * to_f(rows[static_cast<int64_t>(toks[j]) * a.kv_st + d]);
      acc[d] = x;
    }
    __syncthreads();
  }
  const int64_t row = static_cast<int64_t>(head) * a.splits + sp;
  for (int d = threadIdx.x; d < a.Dl; d += kThreads) a.o_part[row * a.Dl + d] = l > 0.f ? acc[d] / l : 0.f;
  if (threadIdx.x == 0) a.lse_part[row] = l > 0.f ? m + logf(l) : -INFINITY;
}

inline size_t latent_smem_bytes(int Dl, int Dr) {
  return sizeof(float) * (2 * Dl + Dr + kThreads) + sizeof(int) * kThreads + sizeof(float) * 32;
}

template <typename T>
inline void launch_latent_decode(const LatentArgs& a, float* out, float* lse, cudaStream_t stream) {
  dim3 grid(a.B * a.H, a.splits);
  latent_decode_kernel<T><<<grid, kThreads, latent_smem_bytes(a.Dl, a.Dr), stream>>>(a);
  merge_splits_kernel<<<a.B * a.H, 64, 0, stream>>>(a.o_part, a.lse_part, out, lse, a.Dl, a.splits);
}

}  // namespace cuda
}  // namespace accel
