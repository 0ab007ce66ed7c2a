// Torch-facing launcher for the CPU decode-attention kernel. Every precondition is checked here so
// that a bad call fails with a message naming the argument, never inside the kernel.
#include <torch/extension.h>

#include <limits>

#include "accel/cpu/decode_attention.h"
#include "accel/cpu/linear.h"

namespace {

void check_kv(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be [B, Hkv, capacity, D], got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, name, " must be contiguous in the head dimension");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16 ||
                  t.scalar_type() == torch::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

}  // namespace

std::vector<torch::Tensor> decode_attention_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                torch::Tensor lengths,
                                                c10::optional<torch::Tensor> indices,
                                                c10::optional<torch::Tensor> valid, double scale,
                                                bool return_lse, int64_t num_threads,
                                                c10::optional<torch::Tensor> scores,
                                                c10::optional<torch::Tensor> offsets,
                                                c10::optional<torch::Tensor> head_mask) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor");
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "q must be float32 (cast in the caller)");
  q = q.contiguous();
  check_kv(k, "k");
  check_kv(v, "v");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must have the same dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "k/v batch ", k.size(0), " != q batch ", B);
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "k/v head_dim must equal q head_dim ", D);
  TORCH_CHECK(v.size(1) == Hkv, "k and v must have the same number of KV heads");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads ", H, " must be a multiple of KV heads ", Hkv);
  TORCH_CHECK(H / Hkv <= accel::cpu::kMaxGroup, "GQA group size ", H / Hkv, " exceeds ",
              accel::cpu::kMaxGroup);
  TORCH_CHECK(lengths.scalar_type() == torch::kInt32 && lengths.numel() == B * Hkv,
              "lengths must be int32 with B*Hkv = ", B * Hkv, " entries");
  lengths = lengths.contiguous();
  const int64_t cap = std::min(k.size(2), v.size(2));
  const int64_t* off_p = nullptr;
  torch::Tensor off_c;
  if (offsets.has_value() && offsets->defined()) {
    // ragged pool: k/v are [B, Hkv, R, D] views with zero batch/head strides over R rows, and head bh's
    // tokens (or index-list positions) are local to its segment starting at row offsets[bh]
    off_c = offsets->contiguous();
    TORCH_CHECK(off_c.scalar_type() == torch::kInt64 && off_c.numel() == B * Hkv,
                "offsets must be int64 with B*Hkv = ", B * Hkv, " entries");
    TORCH_CHECK(k.stride(0) == 0 && k.stride(1) == 0 && v.stride(0) == 0 && v.stride(1) == 0,
                "with offsets, k/v must be row pools expanded to [B, Hkv, R, D] (zero batch/head strides)");
    off_p = off_c.data_ptr<int64_t>();
    for (int64_t bh = 0; bh < B * Hkv; ++bh)
      TORCH_CHECK(off_p[bh] >= 0 && off_p[bh] <= cap, "offsets[", bh, "] = ", off_p[bh], " is outside the pool of ",
                  cap, " rows");
  }
  // rows of head bh that may be addressed: the whole buffer, or the pool from the head's offset on
  auto limit = [&](int64_t bh) { return off_p ? cap - off_p[bh] : cap; };
  int64_t max_pos = 0;  // one past the largest token position addressed (size needed for `scores`)

  accel::cpu::DecodeParams p;
  if (indices.has_value() && indices->defined()) {
    auto& ix = *indices;
    TORCH_CHECK(ix.scalar_type() == torch::kInt32 && ix.dim() == 3 && ix.size(0) == B &&
                    ix.size(1) == Hkv && ix.stride(2) == 1,
                "indices must be int32 [B, Hkv, S] contiguous in the last dimension");
    TORCH_CHECK(ix.stride(1) == ix.size(2) && ix.stride(0) == Hkv * ix.size(2), "indices must be contiguous");
    // Plain loops, not torch ops: this check runs on every decode call of every layer, and a chain of
    // small torch ops (masked_select, min, max, item) costs ~200 us from cold caches, more than the
    // attention itself over a few hundred selected tokens. Only the first lengths[b, h] entries of
    // each list are read (the rest may be -1 padding).
    const int32_t* ln = lengths.data_ptr<int32_t>();
    const int32_t* ip = ix.data_ptr<int32_t>();
    const int64_t S = ix.size(2);
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      TORCH_CHECK(ln[bh] >= 0 && ln[bh] <= S, "lengths[", bh / Hkv, ", ", bh % Hkv, "] = ", ln[bh],
                  " is outside [0, index list size ", S, "]");
      int32_t lo = 0, hi = -1;
      const int32_t* row = ip + bh * S;
      if (ln[bh] > 0) lo = hi = row[0];
      for (int64_t i = 1; i < ln[bh]; ++i) {
        lo = std::min(lo, row[i]);
        hi = std::max(hi, row[i]);
      }
      TORCH_CHECK(lo >= 0 && hi < limit(bh), "indices must lie in [0, capacity=", limit(bh), "), got [", lo, ", ",
                  hi, "]");
      max_pos = std::max<int64_t>(max_pos, hi + 1);
    }
    p.indices = ix.data_ptr<int32_t>();
    p.idx_stride = ix.size(2);
  } else {
    const int32_t* ln = lengths.data_ptr<int32_t>();
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      TORCH_CHECK(ln[bh] >= 0 && ln[bh] <= limit(bh), "lengths[", bh / Hkv, ", ", bh % Hkv, "] = ", ln[bh],
                  " is outside [0, cache capacity ", limit(bh), "]");
      max_pos = std::max<int64_t>(max_pos, ln[bh]);
    }
  }
  torch::Tensor mask_c;
  if (head_mask.has_value() && head_mask->defined()) {  // bit g: query head kh * G + g attends the entry
    TORCH_CHECK(p.indices != nullptr, "head_mask needs indices");
    mask_c = head_mask->contiguous();
    TORCH_CHECK(mask_c.scalar_type() == torch::kInt64 && mask_c.sizes() == indices->sizes(),
                "head_mask must be int64 shaped like indices ", indices->sizes());
    p.head_mask = reinterpret_cast<const uint64_t*>(mask_c.data_ptr<int64_t>());
  }
  torch::Tensor valid_c;
  if (valid.has_value() && valid->defined()) {
    valid_c = valid->to(torch::kUInt8);
    TORCH_CHECK(valid_c.dim() == 2 && valid_c.size(0) == B, "valid must be [B, T]");
    TORCH_CHECK(valid_c.stride(1) == 1, "valid must be contiguous in T");
    p.valid = valid_c.data_ptr<uint8_t>();
    p.valid_sb = valid_c.stride(0);
    p.valid_len = valid_c.size(1);
  }
  auto out = torch::empty({B, H, D}, q.options());
  torch::Tensor lse;
  if (return_lse) lse = torch::empty({B, H}, q.options());
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
  p.lengths = lengths.data_ptr<int32_t>();
  p.offsets = off_p;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.Hkv = static_cast<int>(Hkv); p.D = static_cast<int>(D);
  if (scores.has_value() && scores->defined()) {
    auto& sc = *scores;
    const int64_t need = off_p ? max_pos : cap;
    TORCH_CHECK(sc.scalar_type() == torch::kFloat32 && sc.dim() == 3 && sc.size(0) == B && sc.size(1) == H &&
                    sc.is_contiguous() && sc.size(2) >= need,
                "scores must be a contiguous float32 [B, H, >= ", need, "] tensor");
    p.scores = sc.data_ptr<float>();
    p.scores_stride = sc.size(2);
  }
  p.num_threads = static_cast<int>(num_threads > 0 ? num_threads : at::get_num_threads());
  {
    pybind11::gil_scoped_release nogil;
    if (k.scalar_type() == torch::kFloat32)
      accel::cpu::decode_attention<float>(p);
    else if (k.scalar_type() == torch::kHalf)
      accel::cpu::decode_attention<accel::cpu::f16>(p);
    else
      accel::cpu::decode_attention<uint16_t>(p);
  }
  if (return_lse) return {out, lse};
  return {out};
}

// whether bf16 GEMVs with bf16 inputs run on vdpbf16ps in this build (AVX512_BF16 at compile time, accel/cpu/linear.h)
bool has_bf16_dot_cpu() {
#if defined(ACCEL_BF16_DOT)
  return true;
#else
  return false;
#endif
}

// what the kernels of this build use (-march=native on the build machine, or ACCEL_MARCH): recorded with every
// benchmark CSV, since the tiles and block sizes differ between the 16-lane (AVX-512) and 8-lane (AVX2) forms
std::string build_isa_cpu() {
#if defined(ACCEL_V16F_NATIVE)
  return "AVX512";
#elif defined(__AVX2__)
  return "AVX2";
#else
  return "baseline";
#endif
}
