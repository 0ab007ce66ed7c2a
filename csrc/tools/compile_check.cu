// Instantiates every CUDA kernel template so `nvcc -c` checks the torch-free headers in seconds.
#include "accel/cuda/decode_attention.cuh"

void accel_compile_check(const accel::cuda::DecodeArgs& a, float* out, float* lse) {
  accel::cuda::launch_decode_attention<float>(a, out, lse, 0);
  accel::cuda::launch_decode_attention<__nv_bfloat16>(a, out, lse, 0);
}
