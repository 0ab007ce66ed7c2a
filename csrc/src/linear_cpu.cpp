// Torch-facing launcher for the small-M (decode) linear kernel. x_bf16 (bf16 weights): x holds bf16 values (or may
// be rounded to bf16), so the product may run on vdpbf16ps (accel/cpu/linear.h).
#include <torch/extension.h>

#include "accel/cpu/linear.h"

torch::Tensor small_m_linear_cpu(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias,
                                 int64_t num_threads, bool x_bf16) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be float32");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "weight must be [N, K] contiguous in K");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16 ||
                  w.scalar_type() == torch::kHalf,
              "weight must be float32, bfloat16 or float16");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "x last dim ", x.size(-1), " != weight in_features ", K);
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M >= 1 && M <= 64, "small_m_linear is for decode (1..64 rows), got ", M);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == N, "bias must have ", N, " entries");
  }
  auto y = torch::empty({M, N}, x2.options());
  const int threads = static_cast<int>(num_threads > 0 ? num_threads : at::get_num_threads());
  {
    pybind11::gil_scoped_release nogil;
    if (w.scalar_type() == torch::kFloat32)
      accel::cpu::small_m_linear<float>(x2.data_ptr<float>(), M, K, w.data_ptr<float>(), w.stride(0),
                                        b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N, threads);
    else if (w.scalar_type() == torch::kHalf)
      accel::cpu::small_m_linear<accel::cpu::f16>(x2.data_ptr<float>(), M, K,
                                                  reinterpret_cast<const accel::cpu::f16*>(w.data_ptr()), w.stride(0),
                                                  b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N,
                                                  threads);
    else
      accel::cpu::small_m_linear<uint16_t>(x2.data_ptr<float>(), M, K, reinterpret_cast<uint16_t*>(w.data_ptr()),
                                           w.stride(0), b.defined() ? b.data_ptr<float>() : nullptr,
                                           y.data_ptr<float>(), N, threads, x_bf16);
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}
