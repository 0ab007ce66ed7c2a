// Torch-facing launcher for the CUDA decode kernel (built only with a CUDA torch + nvcc).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "accel/cuda/decode_attention.cuh"

std::vector<torch::Tensor> decode_attention_cuda(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                 torch::Tensor lengths, c10::optional<torch::Tensor> indices,
                                                 c10::optional<torch::Tensor> valid, double scale, int64_t splits) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q [B,H,D], k/v [B,Hkv,T,D]");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k/v must be contiguous in D");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must share a dtype");
  q = q.to(torch::kFloat32).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(H % Hkv == 0, "query heads must be a multiple of KV heads");
  lengths = lengths.to(torch::kInt32).contiguous();
  const int max_len = lengths.max().item<int>();
  splits = std::max<int64_t>(1, splits);
  accel::cuda::DecodeArgs a{};
  a.q = q.data_ptr<float>(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_st = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_st = v.stride(2);
  a.lengths = lengths.data_ptr<int32_t>();
  torch::Tensor ix, vm;
  if (indices.has_value()) { ix = indices->to(torch::kInt32).contiguous(); a.indices = ix.data_ptr<int32_t>(); a.idx_stride = ix.size(2); }
  if (valid.has_value()) { vm = valid->to(torch::kUInt8).contiguous(); a.valid = vm.data_ptr<uint8_t>(); a.valid_sb = vm.stride(0); a.valid_len = vm.size(1); }
  a.scale = static_cast<float>(scale);
  a.B = B; a.H = H; a.Hkv = Hkv; a.D = D; a.splits = splits; a.chunk = (max_len + splits - 1) / splits;
  auto o_part = torch::empty({B * H * splits, D}, q.options());
  auto lse_part = torch::empty({B * H * splits}, q.options());
  a.o_part = o_part.data_ptr<float>(); a.lse_part = lse_part.data_ptr<float>();
  auto out = torch::empty({B, H, D}, q.options());
  auto lse = torch::empty({B, H}, q.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (k.scalar_type() == torch::kBFloat16)
    accel::cuda::launch_decode_attention<__nv_bfloat16>(a, out.data_ptr<float>(), lse.data_ptr<float>(), stream);
  else
    accel::cuda::launch_decode_attention<float>(a, out.data_ptr<float>(), lse.data_ptr<float>(), stream);
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention_cuda, "GQA decode attention (CUDA)");
}
