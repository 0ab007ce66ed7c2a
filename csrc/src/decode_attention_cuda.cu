// Torch-facing launcher for the CUDA decode kernel (built only with a CUDA torch + nvcc).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "accel/cuda/decode_attention.cuh"
#include "accel/cuda/sparse.cuh"
#include "accel/cuda/latent_decode.cuh"

std::vector<torch::Tensor> decode_attention_cuda(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                 torch::Tensor lengths, c10::optional<torch::Tensor> indices,
                                                 c10::optional<torch::Tensor> valid, double scale, int64_t splits,
                                                 c10::optional<torch::Tensor> offsets) {
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
  torch::Tensor ix, vm, off;
  if (offsets.has_value() && offsets->defined()) {
    off = offsets->to(torch::kInt64).contiguous();
    TORCH_CHECK(off.numel() == B * Hkv, "offsets must have B*Hkv entries");
    TORCH_CHECK(k.stride(0) == 0 && k.stride(1) == 0, "with offsets, k/v are row pools with zero batch/head strides");
    a.offsets = off.data_ptr<int64_t>();
  }
  if (indices.has_value()) { ix = indices->to(torch::kInt32).contiguous(); a.indices = ix.data_ptr<int32_t>(); a.idx_stride = ix.size(2); }
  if (valid.has_value()) { vm = valid->to(torch::kUInt8).contiguous(); a.valid = vm.data_ptr<uint8_t>(); a.valid_sb = vm.stride(0); a.valid_len = vm.size(1); }
  a.scale = static_cast<float>(scale);
  a.B = B; a.H = H; a.Hkv = Hkv; a.D = D; a.splits = splits; a.chunk = (max_len + splits - 1) / splits;
  auto o_part = torch::empty({B * H * splits, D}, q.options());
  auto lse_part = torch::empty({B * H * splits}, q.options());
  a.o_part = o_part.data_ptr<float>(); a.lse_part = lse_part.data_ptr<float>();
  auto out = torch::empty({B, H, D}, q.options());
  auto lse = torch::empty({B, H}, q.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (k.scalar_type() == torch::kBFloat16)
    accel::cuda::launch_decode_attention<__nv_bfloat16>(a, out.data_ptr<float>(), lse.data_ptr<float>(), stream);
  else
    accel::cuda::launch_decode_attention<float>(a, out.data_ptr<float>(), lse.data_ptr<float>(), stream);
  return {out, lse};
}

// chunk scores for selection (top-k / sort of the small score tensor happen in torch)
torch::Tensor chunk_scores_cuda(torch::Tensor q, torch::Tensor k, torch::Tensor lse, torch::Tensor lengths,
                                int64_t agg, int64_t chunk, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && lse.is_cuda(), "q, k, lse must be CUDA tensors");
  TORCH_CHECK(k.stride(3) == 1, "k must be contiguous in D");
  q = q.to(torch::kFloat32).contiguous();
  lse = lse.to(torch::kFloat32).contiguous();
  lengths = lengths.to(torch::kInt32).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int max_len = lengths.max().item<int>();
  const int64_t n_chunks = (max_len + chunk - 1) / chunk;
  const int64_t Hsel = agg == 3 ? 1 : Hkv;
  auto out = torch::zeros({B, Hsel, n_chunks}, q.options());
  accel::cuda::ChunkScoreArgs a{};
  a.q = q.data_ptr<float>(); a.k = k.data_ptr(); a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_st = k.stride(2);
  a.lse = lse.data_ptr<float>(); a.lengths = lengths.data_ptr<int32_t>(); a.out = out.data_ptr<float>();
  a.B = B; a.H = H; a.Hkv = Hkv; a.D = D; a.Hsel = Hsel; a.chunk = chunk; a.n_chunks = n_chunks; a.agg = agg;
  a.scale = static_cast<float>(scale);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (k.scalar_type() == torch::kBFloat16) accel::cuda::launch_chunk_scores<__nv_bfloat16>(a, stream);
  else accel::cuda::launch_chunk_scores<float>(a, stream);
  return out;
}

torch::Tensor block_sparse_prefill_cuda(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor blocks,
                                        torch::Tensor counts, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  TORCH_CHECK(q.size(3) <= 256, "head_dim up to 256");
  q = q.to(torch::kFloat32).contiguous();
  blocks = blocks.to(torch::kInt32).contiguous();
  counts = counts.to(torch::kInt32).contiguous();
  auto out = torch::empty_like(q);
  accel::cuda::BlockSparseArgs a{};
  a.q = q.data_ptr<float>(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_st = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_st = v.stride(2);
  a.blocks = blocks.data_ptr<int32_t>(); a.counts = counts.data_ptr<int32_t>(); a.max_kb = blocks.size(2);
  a.B = q.size(0); a.H = q.size(1); a.Hkv = k.size(1); a.D = q.size(3); a.nqb = blocks.size(1);
  a.Tq = q.size(2); a.Tk = k.size(2); a.scale = static_cast<float>(scale); a.out = out.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (k.scalar_type() == torch::kBFloat16) accel::cuda::launch_block_sparse_prefill<__nv_bfloat16>(a, stream);
  else accel::cuda::launch_block_sparse_prefill<float>(a, stream);
  return out;
}

// MLA / TPLA-shard decode over latent rows [c | k_rope] (value = c): see accel/cuda/latent_decode.cuh
std::vector<torch::Tensor> latent_decode_cuda(torch::Tensor q, torch::Tensor kv, torch::Tensor lengths, int64_t dl,
                                              c10::optional<torch::Tensor> indices, c10::optional<torch::Tensor> valid,
                                              double scale) {
  TORCH_CHECK(q.is_cuda() && kv.is_cuda(), "q and kv must be CUDA tensors");
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3 && kv.stride(2) == 1, "q [B,H,Dl+Dr], kv [B,T,Dl+Dr] contiguous in its last dim");
  q = q.to(torch::kFloat32).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2);
  TORCH_CHECK(kv.size(0) == B && kv.size(2) == Dk && dl >= 1 && dl <= Dk, "kv must be [B, T, Dk] with 1 <= dl <= Dk");
  lengths = lengths.to(torch::kInt32).contiguous();
  const int max_len = lengths.max().item<int>();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(16, max_len / 1024));
  accel::cuda::LatentArgs a{};
  a.q = q.data_ptr<float>(); a.kv = kv.data_ptr(); a.kv_sb = kv.stride(0); a.kv_st = kv.stride(1);
  a.lengths = lengths.data_ptr<int32_t>();
  torch::Tensor ix, vm;
  if (indices.has_value()) { ix = indices->to(torch::kInt32).contiguous(); a.indices = ix.data_ptr<int32_t>(); a.idx_stride = ix.size(1); }
  if (valid.has_value()) { vm = valid->to(torch::kUInt8).contiguous(); a.valid = vm.data_ptr<uint8_t>(); a.valid_sb = vm.stride(0); }
  a.scale = static_cast<float>(scale);
  a.B = B; a.H = H; a.Dl = dl; a.Dr = Dk - dl; a.splits = splits; a.chunk = (max_len + splits - 1) / splits;
  auto o_part = torch::empty({B * H * splits, dl}, q.options());
  auto lse_part = torch::empty({B * H * splits}, q.options());
  a.o_part = o_part.data_ptr<float>(); a.lse_part = lse_part.data_ptr<float>();
  auto out = torch::empty({B, H, dl}, q.options());
  auto lse = torch::empty({B, H}, q.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (kv.scalar_type() == torch::kBFloat16)
    accel::cuda::launch_latent_decode<__nv_bfloat16>(a, out.data_ptr<float>(), lse.data_ptr<float>(), stream);
  else
    accel::cuda::launch_latent_decode<float>(a, out.data_ptr<float>(), lse.data_ptr<float>(), stream);
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention_cuda, "GQA decode attention (CUDA)");
  m.def("latent_decode", &latent_decode_cuda, "MLA / TPLA-shard latent decode attention (CUDA)");
  m.def("chunk_scores", &chunk_scores_cuda, "aggregated chunk scores for top-k selection (CUDA)");
  m.def("block_sparse_prefill", &block_sparse_prefill_cuda, "block-sparse causal prefill (CUDA)");
}
