// Torch-facing launcher for the CPU latent (MLA / TPLA shard) decode kernel. Every precondition is
// checked here, so a bad call fails with a message naming the argument, never inside the kernel.
#include <torch/extension.h>

#include "accel/cpu/latent_decode.h"

std::vector<torch::Tensor> latent_decode_cpu(torch::Tensor q, torch::Tensor kv, torch::Tensor lengths, int64_t dl,
                                             c10::optional<torch::Tensor> indices, c10::optional<torch::Tensor> valid,
                                             double scale, int64_t num_threads) {
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "q and kv must be CPU tensors");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32, "q must be float32 [B, H, Dl + Dr], got ",
              q.scalar_type(), " ", q.sizes());
  q = q.contiguous();
  TORCH_CHECK(kv.dim() == 3 && kv.stride(2) == 1, "kv must be [B, T, Dl + Dr] contiguous in its last dimension");
  TORCH_CHECK(kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kBFloat16 ||
                  kv.scalar_type() == torch::kHalf,
              "kv must be float32, bfloat16 or float16, got ", kv.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), T = kv.size(1);
  TORCH_CHECK(kv.size(0) == B, "kv batch ", kv.size(0), " != q batch ", B);
  TORCH_CHECK(kv.size(2) == Dk, "kv rows have ", kv.size(2), " values but q has ", Dk);
  TORCH_CHECK(dl >= 1 && dl <= Dk, "dl (latent width) must be in [1, ", Dk, "], got ", dl);
  TORCH_CHECK(lengths.scalar_type() == torch::kInt32 && lengths.numel() == B, "lengths must be int32 with B = ", B,
              " entries");
  lengths = lengths.contiguous();
  accel::cpu::LatentParams p;
  torch::Tensor idx_c, val_c;
  if (indices.has_value() && indices->defined()) {
    idx_c = indices->contiguous();
    TORCH_CHECK(idx_c.scalar_type() == torch::kInt32 && idx_c.dim() == 2 && idx_c.size(0) == B,
                "indices must be int32 [B, K]");
    p.indices = idx_c.data_ptr<int32_t>();
    p.idx_stride = idx_c.size(1);
    for (int64_t b = 0; b < B; ++b) {
      const int32_t L = lengths.data_ptr<int32_t>()[b];
      TORCH_CHECK(L >= 0 && L <= idx_c.size(1), "lengths[", b, "] = ", L, " exceeds the index list length ",
                  idx_c.size(1));
      for (int32_t j = 0; j < L; ++j) {
        const int32_t t = p.indices[b * p.idx_stride + j];
        TORCH_CHECK(t >= 0 && t < T, "indices[", b, ", ", j, "] = ", t, " is outside the cache of ", T, " rows");
      }
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {
      const int32_t L = lengths.data_ptr<int32_t>()[b];
      TORCH_CHECK(L >= 0 && L <= T, "lengths[", b, "] = ", L, " is outside [0, ", T, "]");
    }
  }
  if (valid.has_value() && valid->defined()) {
    val_c = valid->to(torch::kUInt8).contiguous();
    TORCH_CHECK(val_c.dim() == 2 && val_c.size(0) == B && val_c.size(1) >= T, "valid must be bool [B, >= T]");
    p.valid = val_c.data_ptr<uint8_t>();
    p.valid_stride = val_c.size(1);
  }
  auto out = torch::empty({B, H, dl}, torch::dtype(torch::kFloat32));
  auto lse = torch::empty({B, H}, torch::dtype(torch::kFloat32));
  p.q = q.data_ptr<float>();
  p.kv = kv.data_ptr();
  p.kv_sb = kv.stride(0);
  p.kv_st = kv.stride(1);
  p.lengths = lengths.data_ptr<int32_t>();
  p.B = B; p.H = H; p.Dl = dl; p.Dr = Dk - dl;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.num_threads = static_cast<int>(num_threads);
  {
    pybind11::gil_scoped_release nogil;
    if (kv.scalar_type() == torch::kFloat32) accel::cpu::latent_decode<float>(p);
    else if (kv.scalar_type() == torch::kHalf) accel::cpu::latent_decode<accel::cpu::f16>(p);
    else accel::cpu::latent_decode<uint16_t>(p);
  }
  return {out, lse};
}
