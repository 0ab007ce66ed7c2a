// Memory-system probe for the benchmarks: the bandwidth a plain read of scattered rows reaches.
//
// Sparse decode reads K/V rows at arbitrary positions, so its bandwidth ceiling is not the streaming
// read bandwidth (which the hardware prefetcher helps) but the rate at which the memory system serves
// independent row-sized reads. This function sums the given rows of a [R, W] fp32 buffer with a
// software prefetch `distance` rows ahead (with the kernels' locality, ACCEL_PF_LOCALITY), doing no other work, so
// its GB/s is that ceiling.
#include <torch/extension.h>

#include "accel/cpu/vec_math.h"

double scattered_read_probe_cpu(torch::Tensor buf, torch::Tensor rows, int64_t distance) {
  TORCH_CHECK(buf.device().is_cpu() && buf.dim() == 2 && buf.is_contiguous() && buf.scalar_type() == torch::kFloat32,
              "buf must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(buf.size(1) % 16 == 0, "row width must be a multiple of 16 floats");
  TORCH_CHECK(rows.scalar_type() == torch::kInt32 && rows.dim() == 1 && rows.is_contiguous(),
              "rows must be a contiguous 1-D int32 tensor");
  const float* b = buf.data_ptr<float>();
  const int32_t* r = rows.data_ptr<int32_t>();
  const int64_t n = rows.numel(), W = buf.size(1), R = buf.size(0);
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(r[i] >= 0 && r[i] < R, "row index out of range");
  using accel::cpu::v16f;
  v16f acc = accel::cpu::splat16(0.f);
  {
    pybind11::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) {
      if (distance > 0 && i + distance < n) {
        const char* p = reinterpret_cast<const char*>(b + static_cast<int64_t>(r[i + distance]) * W);
        for (int64_t off = 0; off < W * 4; off += 64) __builtin_prefetch(p + off, 0, ACCEL_PF_LOCALITY);
      }
      const float* row = b + static_cast<int64_t>(r[i]) * W;
      for (int64_t c = 0; c < W; c += 16) acc += accel::cpu::load16(row + c);
    }
  }
  return accel::cpu::hsum16(acc);
}

// Flush every cache line of `t`'s storage from all cache levels (x86 clflush). Benchmarks use it to put
// exactly a layer's K/V data out of cache, the state it is in when that layer runs in a decode step,
// while code and small metadata stay as warm as they are between the layers of a real step.
bool flush_cache_lines_cpu(torch::Tensor t) {
  TORCH_CHECK(t.device().is_cpu(), "flush_cache_lines needs a CPU tensor");
#if defined(__x86_64__) || defined(__i386__)
  const char* p = static_cast<const char*>(t.data_ptr());
  const int64_t n = t.numel() * t.element_size();
  {
    pybind11::gil_scoped_release nogil;
    for (int64_t off = 0; off < n; off += 64) __builtin_ia32_clflush(p + off);
    __builtin_ia32_mfence();
  }
  return true;
#else
  return false;  // no user-level line flush on this architecture: the caller evicts by streaming
#endif
}
