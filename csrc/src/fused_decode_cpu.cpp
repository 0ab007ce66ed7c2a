// Torch-facing launchers for the fused decode-layer halves (accel/cpu/fused_layer.h).
#include <torch/extension.h>

#include "accel/cpu/fused_layer.h"

namespace {

accel::cpu::Mat as_mat(const torch::Tensor& w, int64_t K, const c10::optional<torch::Tensor>& bias, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.stride(1) == 1, name, " must be a CPU [N, K] weight, contiguous in K");
  TORCH_CHECK(w.size(1) == K, name, " has in_features ", w.size(1), ", expected ", K);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16, name, " must be float32 or bfloat16");
  accel::cpu::Mat m;
  m.w = w.data_ptr();
  m.ldw = w.stride(0);
  m.bf16 = w.scalar_type() == torch::kBFloat16;
  m.N = static_cast<int>(w.size(0));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == w.size(0),
                name, " bias must be a contiguous float32 vector of ", w.size(0));
    m.bias = bias->data_ptr<float>();
  }
  return m;
}

const float* f32vec(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 tensor of ", n, " values");
  return t.data_ptr<float>();
}

int threads() { return at::get_num_threads(); }

// a 2-D row tensor as contiguous fp32 (a bf16 model's rows widened exactly); `copy`: always a new tensor
torch::Tensor rows_f32(const torch::Tensor& x, const char* name, const char* shape, bool copy = false) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              name, " must be a CPU float32 or bfloat16 ", shape, " tensor");
  // (.to with MemoryFormat::Contiguous keeps a transposed 2-D view as it is: contiguous() is what makes rows dense)
  return x.to(torch::kFloat32, /*non_blocking=*/false, copy).contiguous();
}

}  // namespace

// h [M, C] fp32 or bf16 -> (q [M, H*D], k [M, Hkv*D], v [M, Hkv*D]) computed in fp32, returned in h's dtype (a bf16
// model's q, k, v rounded to bf16 where transformers' modules round them)
std::vector<torch::Tensor> fused_attn_in_cpu(torch::Tensor h_in, torch::Tensor ln, double eps, torch::Tensor wq,
                                             torch::Tensor wk, torch::Tensor wv, c10::optional<torch::Tensor> bq,
                                             c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
                                             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                                             double qk_eps, torch::Tensor cos, torch::Tensor sin, int64_t H,
                                             int64_t Hkv) {
  const torch::Tensor h = rows_f32(h_in, "h", "[M, C]");
  const bool bf16 = h_in.scalar_type() == torch::kBFloat16;
  const int64_t M = h.size(0), C = h.size(1);
  TORCH_CHECK(M >= 1 && M <= 64, "fused decode takes 1..64 token rows, got ", M);
  accel::cpu::AttnInParams p;
  p.h = h.data_ptr<float>();
  p.M = static_cast<int>(M);
  p.C = static_cast<int>(C);
  p.H = static_cast<int>(H);
  p.Hkv = static_cast<int>(Hkv);
  p.ln = f32vec(ln, C, "input norm weight");
  p.eps = static_cast<float>(eps);
  p.wq = as_mat(wq, C, bq, "q weight");
  p.wk = as_mat(wk, C, bk, "k weight");
  p.wv = as_mat(wv, C, bv, "v weight");
  TORCH_CHECK(p.wq.N % H == 0, "q weight rows ", p.wq.N, " are not a multiple of ", H, " heads");
  p.D = p.wq.N / p.H;
  TORCH_CHECK(p.wk.N == Hkv * p.D && p.wv.N == Hkv * p.D, "k/v weights must have ", Hkv * p.D, " rows");
  if (q_norm.has_value() && q_norm->defined()) p.q_norm = f32vec(*q_norm, p.D, "q norm weight");
  if (k_norm.has_value() && k_norm->defined()) p.k_norm = f32vec(*k_norm, p.D, "k norm weight");
  p.qk_eps = static_cast<float>(qk_eps);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == p.D &&
                  (cos.size(0) == 1 || cos.size(0) == M),
              "cos/sin must be contiguous float32 [1 or M, head_dim]");
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.cs_stride = cos.size(0) == 1 ? 0 : p.D;
  auto q = torch::empty({M, H * p.D}, h.options());
  auto k = torch::empty({M, Hkv * p.D}, h.options());
  auto v = torch::empty({M, Hkv * p.D}, h.options());
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.threads = threads();
  {
    pybind11::gil_scoped_release nogil;
    accel::cpu::attn_in(p);
  }
  // rounded by torch itself (round to nearest even): exactly what .to(torch.bfloat16) gives in Python
  if (bf16) return {q.to(torch::kBFloat16), k.to(torch::kBFloat16), v.to(torch::kBFloat16)};
  return {q, k, v};
}

// (h [M, C], a [M, H*D]) -> h + o(a) + mlp(norm(h + o(a))), a new tensor (h is not modified); h and a fp32 or bf16
// (widened exactly), computed in fp32, returned in h's dtype
torch::Tensor fused_attn_out_mlp_cpu(torch::Tensor h_in, torch::Tensor a_in, torch::Tensor wo, c10::optional<torch::Tensor> bo,
                                     torch::Tensor ln, double eps, torch::Tensor wg, torch::Tensor wu, torch::Tensor wd) {
  const bool bf16 = h_in.scalar_type() == torch::kBFloat16;
  auto out = rows_f32(h_in, "h", "[M, C]", /*copy=*/true);  // the kernel adds into it in place: h is not modified
  const torch::Tensor a = rows_f32(a_in, "the attention output", "[M, H*D]");
  TORCH_CHECK(a.size(0) == out.size(0), "the attention output has ", a.size(0), " rows, h has ", out.size(0));
  TORCH_CHECK(out.size(0) >= 1 && out.size(0) <= 64, "fused decode takes 1..64 token rows, got ", out.size(0));
  accel::cpu::AttnOutParams p;
  p.h = out.data_ptr<float>();
  p.a = a.data_ptr<float>();
  p.M = static_cast<int>(out.size(0));
  p.C = static_cast<int>(out.size(1));
  p.HD = static_cast<int>(a.size(1));
  p.wo = as_mat(wo, p.HD, bo, "o weight");
  TORCH_CHECK(p.wo.N == p.C, "o weight must have ", p.C, " rows");
  p.ln = f32vec(ln, p.C, "post-attention norm weight");
  p.eps = static_cast<float>(eps);
  p.wg = as_mat(wg, p.C, c10::nullopt, "gate weight");
  p.wu = as_mat(wu, p.C, c10::nullopt, "up weight");
  p.I = p.wg.N;
  TORCH_CHECK(p.wu.N == p.I, "up weight must have ", p.I, " rows");
  p.wd = as_mat(wd, p.I, c10::nullopt, "down weight");
  TORCH_CHECK(p.wd.N == p.C, "down weight must have ", p.C, " rows");
  p.threads = threads();
  {
    pybind11::gil_scoped_release nogil;
    accel::cpu::attn_out_mlp(p);
  }
  return bf16 ? out.to(torch::kBFloat16) : out;
}
