// CUDA twins of the CPU selection and block-sparse prefill kernels. Torch-free; compile-checked
// with nvcc here (sm_80, sm_90), not executed (no GPU in CI).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "accel/cuda/decode_attention.cuh"

namespace accel {
namespace cuda {

// Chunk scores for top-k selection: probabilities p_h(t) = exp(q_h.k_t * scale - lse_h), aggregated
// over the heads [h0, h0 + nh) of a selection group (agg 0 = max, 1 = mean, 2 = sum; shared = all
// heads with max), summed over `chunk` consecutive tokens. One thread per chunk.
struct ChunkScoreArgs {
  const float* q;    // [B, H, D]
  const void* k;     // strided
  int64_t k_sb, k_sh, k_st;
  const float* lse;  // [B, H]
  const int32_t* lengths;  // [B]
  float* out;        // [B, Hsel, n_chunks]
  int B, H, Hkv, D, Hsel, chunk, n_chunks, agg;
  float scale;
};

template <typename T>
__global__ void chunk_scores_kernel(ChunkScoreArgs a) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int bs = blockIdx.y;  // b * Hsel + hs
  const int b = bs / a.Hsel, hs = bs % a.Hsel;
  if (c >= a.n_chunks) return;
  const int G = a.H / a.Hkv;
  const int h0 = a.Hsel == 1 ? 0 : hs * G, nh = a.Hsel == 1 ? a.H : G;
  const int len = a.lengths[b];
  float total = 0.f;
  for (int t = c * a.chunk; t < min(len, (c + 1) * a.chunk); ++t) {
    float aggv = 0.f;
    for (int h = h0; h < h0 + nh; ++h) {
      const T* kr = static_cast<const T*>(a.k) + b * a.k_sb + (h / G) * a.k_sh + static_cast<int64_t>(t) * a.k_st;
      const float* qh = a.q + (static_cast<int64_t>(b) * a.H + h) * a.D;
      float dot = 0.f;
      for (int d = 0; d < a.D; ++d) dot += qh[d] * to_f(kr[d]);
      const float p = __expf(dot * a.scale - a.lse[b * a.H + h]);
      aggv = (a.agg == 0 || a.Hsel == 1) ? fmaxf(aggv, p) : aggv + p;
    }
    if (a.agg == 1 && a.Hsel != 1) aggv /= nh;
    total += aggv;
  }
  a.out[static_cast<int64_t>(bs) * a.n_chunks + c] = total;
}

// Block-sparse causal prefill: one thread block per (b, h, 64-query block), one thread per query row;
// each thread walks the key blocks of its list with an online softmax (q row and accumulator in
// registers / local memory, D <= 256).
struct BlockSparseArgs {
  const float* q;  // [B, H, Tq, D]
  const void* k;
  const void* v;
  int64_t k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  const int32_t* blocks;  // [H, nqb, max_kb]
  const int32_t* counts;  // [H, nqb]
  int max_kb, B, H, Hkv, D, nqb;
  int64_t Tq, Tk;
  float scale;
  float* out;
};

template <typename T>
__global__ void block_sparse_prefill_kernel(BlockSparseArgs a) {
  const int qb = blockIdx.x, bh = blockIdx.y;
  const int b = bh / a.H, h = bh % a.H, kh = h / (a.H / a.Hkv);
  const int64_t row = static_cast<int64_t>(qb) * 64 + threadIdx.x;
  if (row >= a.Tq) return;
  const int64_t qpos = a.Tk - a.Tq + row;
  const float* qr = a.q + ((static_cast<int64_t>(b) * a.H + h) * a.Tq + row) * a.D;
  float acc[256];
  for (int d = 0; d < a.D; ++d) acc[d] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int cnt = a.counts[h * a.nqb + qb];
  for (int i = 0; i < cnt; ++i) {
    const int64_t j0 = static_cast<int64_t>(a.blocks[(static_cast<int64_t>(h) * a.nqb + qb) * a.max_kb + i]) * 64;
    for (int64_t t = j0; t < min(j0 + 64, a.Tk); ++t) {
      if (t > qpos) break;
      const T* kr = static_cast<const T*>(a.k) + b * a.k_sb + kh * a.k_sh + t * a.k_st;
      float s = 0.f;
      for (int d = 0; d < a.D; ++d) s += qr[d] * to_f(kr[d]);
      s *= a.scale;
      const float nm = fmaxf(m, s);
      const float alpha = m == -INFINITY ? 0.f : __expf(m - nm);
      const float p = __expf(s - nm);
      const T* vr = static_cast<const T*>(a.v) + b * a.v_sb + kh * a.v_sh + t * a.v_st;
      for (int d = 0; d < a.D; ++d) acc[d] = acc[d] * alpha + p * to_f(vr[d]);
      l = l * alpha + p;
      m = nm;
    }
  }
  float* o = a.out + ((static_cast<int64_t>(b) * a.H + h) * a.Tq + row) * a.D;
  for (int d = 0; d < a.D; ++d) o[d] = l > 0.f ? acc[d] / l : 0.f;
}

template <typename T>
inline void launch_chunk_scores(const ChunkScoreArgs& a, cudaStream_t stream) {
  dim3 grid((a.n_chunks + 127) / 128, a.B * a.Hsel);
  chunk_scores_kernel<T><<<grid, 128, 0, stream>>>(a);
}

template <typename T>
inline void launch_block_sparse_prefill(const BlockSparseArgs& a, cudaStream_t stream) {
  dim3 grid(a.nqb, a.B * a.H);
  block_sparse_prefill_kernel<T><<<grid, 64, 0, stream>>>(a);
}

}  // namespace cuda
}  // namespace accel
