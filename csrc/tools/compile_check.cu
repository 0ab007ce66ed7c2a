// Instantiates every CUDA kernel template so `nvcc -c` checks the torch-free headers in seconds.
#include "accel/cuda/decode_attention.cuh"
#include "accel/cuda/sparse.cuh"
#include "accel/cuda/latent_decode.cuh"

void accel_compile_check(const accel::cuda::DecodeArgs& a, float* out, float* lse,
                         const accel::cuda::ChunkScoreArgs& c, const accel::cuda::BlockSparseArgs& s,
                         const accel::cuda::LatentArgs& l) {
  accel::cuda::launch_decode_attention<float>(a, out, lse, 0);
  accel::cuda::launch_decode_attention<__nv_bfloat16>(a, out, lse, 0);
  accel::cuda::launch_chunk_scores<float>(c, 0);
  accel::cuda::launch_chunk_scores<__nv_bfloat16>(c, 0);
  accel::cuda::launch_block_sparse_prefill<float>(s, 0);
  accel::cuda::launch_block_sparse_prefill<__nv_bfloat16>(s, 0);
  accel::cuda::launch_latent_decode<float>(l, out, lse, 0);
  accel::cuda::launch_latent_decode<__nv_bfloat16>(l, out, lse, 0);
}
