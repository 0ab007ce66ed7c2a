// Torch-facing launchers for the fused decode-layer halves (accel/cpu/fused_layer.h) and for a whole dense decoder
// stack in one call.
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>

#include "accel/cpu/decode_attention.h"
#include "accel/cpu/fused_layer.h"
#include "accel/cpu/quest.h"
#include "accel/cpu/ragged_kv.h"

namespace {

accel::cpu::Mat as_mat(const torch::Tensor& w, int64_t K, const c10::optional<torch::Tensor>& bias, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.stride(1) == 1, name, " must be a CPU [N, K] weight, contiguous in K");
  TORCH_CHECK(w.size(1) == K, name, " has in_features ", w.size(1), ", expected ", K);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf,
              name, " must be float32, bfloat16 or float16");
  accel::cpu::Mat m;
  m.w = w.data_ptr();
  m.ldw = w.stride(0);
  m.type = w.scalar_type() == torch::kBFloat16 ? accel::cpu::WType::kBF16
           : w.scalar_type() == torch::kHalf   ? accel::cpu::WType::kF16
                                               : accel::cpu::WType::kF32;
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

bool half_rows(const torch::Tensor& x) {  // a 16-bit model's rows: bf16 or fp16
  return x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf;
}

// a 2-D row tensor as contiguous fp32 (a 16-bit model's rows widened exactly); `copy`: always a new tensor
torch::Tensor rows_f32(const torch::Tensor& x, const char* name, const char* shape, bool copy = false) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || half_rows(x)),
              name, " must be a CPU float32, bfloat16 or float16 ", shape, " tensor");
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
                                             int64_t Hkv, bool bf16_inputs) {
  const torch::Tensor h = rows_f32(h_in, "h", "[M, C]");
  const bool half = half_rows(h_in);
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
  p.wq.x_bf16 = p.wk.x_bf16 = p.wv.x_bf16 = bf16_inputs;
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
  // rounded by torch itself (round to nearest even): exactly what .to(torch.bfloat16 / torch.float16) gives in Python
  const auto dt = h_in.scalar_type();
  if (half) return {q.to(dt), k.to(dt), v.to(dt)};
  return {q, k, v};
}

// (h [M, C], a [M, H*D]) -> h + o(a) + mlp(norm(h + o(a))), a new tensor (h is not modified); h and a fp32 or bf16
// (widened exactly), computed in fp32, returned in h's dtype
torch::Tensor fused_attn_out_mlp_cpu(torch::Tensor h_in, torch::Tensor a_in, torch::Tensor wo, c10::optional<torch::Tensor> bo,
                                     torch::Tensor ln, double eps, torch::Tensor wg, torch::Tensor wu, torch::Tensor wd,
                                     bool bf16_inputs) {
  const bool half = half_rows(h_in);
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
  p.wo.x_bf16 = bf16_inputs || a_in.scalar_type() == torch::kBFloat16;  // bf16 rows of `a`: exact
  p.wg.x_bf16 = p.wu.x_bf16 = p.wd.x_bf16 = bf16_inputs;
  p.threads = threads();
  {
    pybind11::gil_scoped_release nogil;
    accel::cpu::attn_out_mlp(p);
  }
  return half ? out.to(h_in.scalar_type()) : out;
}

// ---- the whole decoder stack of a decode step in one call ------------------------------------------------------
//
// For a model whose every layer attends densely over accel's cache, the per-layer Python between the two fused halves
// (the cache append, the attention function's routing, the policy's decode, the KV policy's eviction, the kernel's
// launchers) costs more than a layer's attention at short contexts, and more than a compressed layer's attention at
// any context. This runs L layers back to back: for each, attn_in; the new k and v written into the layer's cache;
// decode attention of the new query over what the cache holds; for a compressed layer (accel's ragged per-head pools,
// python/accel/cache/ragged.py) the KV policy's decode-time bookkeeping; and attn_out_mlp. A layer's cache is either
//   * dense buffers [B, Hkv, capacity, D]: k/v written at position `pos`, attention over [start, pos] (with `valid`);
//   * a ragged pool: k/v appended to every head at absolute position positions[l], attention over each head's live
//     rows; optionally each kept token's attention added to its eviction score (H2O-style accumulation, the
//     per-layer ragged_accumulate) and every head evicted down to its budget (ragged_evict), in that order, as the
//     per-layer path runs them (accel.attention.decode.ragged_decode, BudgetedKVPolicy.after_decode).
// A 16-bit model's values are rounded to its dtype where the per-layer path rounds them (q, k, v after attn_in; the
// attention output; each layer's output), with torch's own rounding (c10::BFloat16 / c10::Half, round to nearest
// even), so the result -- the hidden states, the cache, the eviction scores -- is bit-identical to running the layers
// one by one through the fused halves, the policy's decode and its eviction.

namespace {

template <typename H>
void round_inplace(float* x, int64_t n) {  // x <- float(H(x)), torch's rounding (H: c10::BFloat16 or c10::Half)
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(H(x[i]));
}

// one compressed layer's pool and its decode-time bookkeeping (raw pointers into the caller's tensors)
struct RaggedStackLayer {
  char* k = nullptr;
  char* v = nullptr;
  int64_t kb = 0, vb = 0;  // bytes per row
  int64_t* pos = nullptr;
  float* score = nullptr;
  const int64_t* off = nullptr;
  int32_t* len = nullptr;
  const int64_t* cap = nullptr;
  const int64_t* budget = nullptr;  // with evict
  const int64_t* sink_end = nullptr;
  const int64_t* recent = nullptr;
  bool evict = false, by_age = false, accumulate = false;
  int64_t position = 0;  // the new token's absolute position
};

// one Quest layer's page summaries and this step's selection (accel.policies.quest: the layer attends to the top
// k_pages pages by their upper bound, the current page always among them)
struct QuestStackLayer {
  void* kmin = nullptr;  // float32, or bf16 bits when bf16
  void* kmax = nullptr;
  bool bf16 = false;
  int64_t sb = 0, sh = 0, sp = 0;
  int64_t full_pages = 0, k_pages = 0, page = 16, T = 0;  // T: tokens attended, the new one included
  int agg = 0;
  const int64_t* first = nullptr;  // [B] first real position, or nullptr
  std::vector<int32_t> idx, counts;
  std::vector<uint64_t> umask;  // agg none: which query heads of the group selected each entry of the union
};

// the per-layer work after attn_in: round q, k, v; write k, v into the layer's cache; attend (plus a compressed
// layer's accumulation and eviction); round the attention output. Returns the KV rows the attention read.
template <typename H, typename T>
int64_t stack_layer_attention(std::vector<float>& q, std::vector<float>& k, std::vector<float>& v,
                              std::vector<float>& a, const torch::Tensor* kb, const torch::Tensor* vb,
                              const RaggedStackLayer* rg, QuestStackLayer* qs, int64_t B, int64_t Hkv, int64_t D,
                              int64_t pos, accel::cpu::DecodeParams d, std::vector<H>& row_buf, std::vector<float>& scores,
                              std::vector<float>& lse) {
  constexpr bool narrow = !std::is_same<H, float>::value;
  if constexpr (narrow) {
    round_inplace<H>(q.data(), static_cast<int64_t>(q.size()));
    round_inplace<H>(k.data(), static_cast<int64_t>(k.size()));
    round_inplace<H>(v.data(), static_cast<int64_t>(v.size()));
  }
  const int64_t BH = B * Hkv;
  int64_t rows = 0;
  if (rg == nullptr) {
    for (int64_t b = 0; b < B; ++b)  // the new token's k and v at position pos of every (b, kv head)
      for (int64_t kh = 0; kh < Hkv; ++kh) {
        const float* ks = k.data() + (b * Hkv + kh) * D;
        const float* vs = v.data() + (b * Hkv + kh) * D;
        H* kd = static_cast<H*>(kb->data_ptr()) + b * kb->stride(0) + kh * kb->stride(1) + pos * kb->stride(2);
        H* vd = static_cast<H*>(vb->data_ptr()) + b * vb->stride(0) + kh * vb->stride(1) + pos * vb->stride(2);
        for (int64_t i = 0; i < D; ++i) kd[i] = H(ks[i]), vd[i] = H(vs[i]);
      }
    if (qs != nullptr) {  // Quest: the pages filled since the last summary and the partial last page, then the pages
      const int64_t Tn = qs->T;
      if (qs->bf16)
        accel::cpu::quest_summarize<T, uint16_t>(static_cast<const T*>(d.k), d.k_sb, d.k_sh, d.k_st, d.B, d.Hkv, d.D,
                                                 Tn, qs->page, qs->full_pages, static_cast<uint16_t*>(qs->kmin),
                                                 static_cast<uint16_t*>(qs->kmax), qs->sb, qs->sh, qs->sp);
      else
        accel::cpu::quest_summarize<T, float>(static_cast<const T*>(d.k), d.k_sb, d.k_sh, d.k_st, d.B, d.Hkv, d.D, Tn,
                                              qs->page, qs->full_pages, static_cast<float*>(qs->kmin),
                                              static_cast<float*>(qs->kmax), qs->sb, qs->sh, qs->sp);
      accel::cpu::QuestParams p;
      p.q = q.data();
      p.kmin = qs->kmin; p.kmax = qs->kmax; p.bf16 = qs->bf16;
      p.sb = qs->sb; p.sh = qs->sh; p.sp = qs->sp;
      p.B = d.B; p.H = d.H; p.Hkv = d.Hkv; p.D = d.D;
      p.n_pages = (Tn + qs->page - 1) / qs->page;
      p.k_pages = qs->k_pages; p.page = qs->page; p.T = Tn; p.agg = qs->agg;
      p.first = qs->first;
      p.out = qs->idx.data();
      p.counts = qs->counts.data();
      d.indices = qs->idx.data();
      d.idx_stride = qs->k_pages * qs->page;
      d.lengths = qs->counts.data();
      if (qs->agg == 3) {  // agg="none": each query head attends to its own pages, the group's union read once
        p.head_mask = qs->umask.data();  // (decode_attention's head_mask; out and counts then hold the union)
        d.idx_stride *= d.H / Hkv;
        d.head_mask = qs->umask.data();
      }
      accel::cpu::quest_select(p);
    }
    accel::cpu::decode_attention<T>(d);
    for (int64_t i = 0; i < BH; ++i) rows += d.lengths[i];
  } else {
    row_buf.resize(2 * BH * D);  // the new rows in the pool's dtype
    for (int64_t i = 0; i < BH * D; ++i) row_buf[i] = H(k[i]), row_buf[BH * D + i] = H(v[i]);
    accel::cpu::ragged_append_rows(rg->k, rg->v, rg->kb, rg->vb, rg->pos, rg->score, rg->off, rg->len,
                                   reinterpret_cast<const char*>(row_buf.data()),
                                   reinterpret_cast<const char*>(row_buf.data() + BH * D), BH, rg->position);
    int64_t W = 1;
    for (int64_t i = 0; i < BH; ++i) rows += rg->len[i], W = std::max<int64_t>(W, rg->len[i]);
    if (rg->accumulate) {
      scores.resize(static_cast<size_t>(B * d.H * W));
      lse.resize(static_cast<size_t>(B * d.H));
      d.scores = scores.data();
      d.scores_stride = W;
      d.lse = lse.data();
    }
    accel::cpu::decode_attention<T>(d);
    if (rg->accumulate)
      accel::cpu::ragged_accumulate_rows(scores.data(), W, lse.data(), rg->off, rg->len, rg->score, B, d.H, Hkv);
    if (rg->evict)
      accel::cpu::ragged_evict_rows(rg->k, rg->v, rg->kb, rg->vb, rg->pos, rg->score, rg->off, rg->len, rg->budget,
                                    rg->sink_end, rg->recent, BH, rg->by_age);
  }
  if constexpr (narrow) round_inplace<H>(a.data(), static_cast<int64_t>(a.size()));
  return rows;
}

const float* opt_f32vec(const c10::optional<torch::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  return f32vec(*t, n, name);
}

const torch::Tensor& need(const c10::optional<torch::Tensor>& t, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required");
  return *t;
}

void check_meta(const torch::Tensor& t, torch::ScalarType st, int64_t n, size_t l, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == st && t.numel() == n, "layer ", l, ": ",
              name, " must be a contiguous CPU ", st, " tensor of ", n, " entries");
}

}  // namespace

// h [B, C] fp32, bf16 or fp16 (one token per sequence). Per layer l: pre[l] = (ln, wq, wk, wv, bq, bk, bv, q_norm, k_norm),
// post[l] = (wo, bo, ln2, wg, wu, wd), eps[3l..3l+2] = (input norm eps, post-attention norm eps, q/k norm eps).
// A layer's cache: dense buffers k_bufs[l] / v_bufs[l] [B, Hkv, capacity, D] in h's dtype (the new k, v go to position
// `pos`, attention over [start, pos]; `valid`: optional [B, pos + 1 - start] bool/uint8), or, where ragged[l] is not
// empty, a compressed layer's pool: ragged[l] = (k [R, D], v [R, D], pos [R] int64, score [R] float32,
// offsets [B*Hkv] int64, lengths [B*Hkv] int32, caps [B*Hkv] int64[, budget, sink_end, recent [B*Hkv] int64]) with
// ragged_flags[l] = evict (1) | by_age (2) | accumulate (4) and the new token's absolute position positions[l].
// Where quest[l] = (kmin, kmax) is given (a dense layer), the layer attends only to Quest's pages (accel.policies.quest):
// the summaries [B, Hkv, >= pages, D] float32 updated in place from pages quest_args[4l] (pages already summarised)
// on, then the top quest_args[4l+1] pages of quest_args[4l+2] tokens by their upper bound, aggregated over each GQA
// group by quest_args[4l+3] (0 max, 1 mean, 2 sum; 3: each query head selects alone and attends to its own pages, the group's union read once), pages of left padding only last (first: [B] each row's first
// real position), the current page always.
// Returns (the last layer's output [B, C] in h's dtype, the KV rows the attention read (int64 scalar)), or nothing --
// before any layer ran, nothing written -- when a compressed layer has a head with no spare row (grow it and call again).
std::vector<torch::Tensor> fused_decode_stack_cpu(
    torch::Tensor h_in, std::vector<std::vector<c10::optional<torch::Tensor>>> pre,
    std::vector<std::vector<c10::optional<torch::Tensor>>> post, std::vector<double> eps,
    std::vector<c10::optional<torch::Tensor>> k_bufs, std::vector<c10::optional<torch::Tensor>> v_bufs, int64_t start,
    int64_t pos, c10::optional<torch::Tensor> valid, torch::Tensor cos, torch::Tensor sin, int64_t H, int64_t Hkv,
    double scale, std::vector<std::vector<torch::Tensor>> ragged, std::vector<int64_t> ragged_flags,
    std::vector<int64_t> positions, bool bf16_inputs, std::vector<std::vector<torch::Tensor>> quest,
    std::vector<int64_t> quest_args, c10::optional<torch::Tensor> first) {
  const auto dt = h_in.scalar_type();
  auto h = rows_f32(h_in, "h", "[B, C]", /*copy=*/true);
  const int64_t B = h.size(0), C = h.size(1);
  const size_t L = pre.size();
  TORCH_CHECK(B >= 1 && B <= 64, "fused decode takes 1..64 token rows, got ", B);
  TORCH_CHECK(L >= 1 && post.size() == L && eps.size() == 3 * L && k_bufs.size() == L && v_bufs.size() == L,
              "per-layer lists must all have ", L, " entries (eps: ", 3 * L, ")");
  TORCH_CHECK(ragged.empty() || (ragged.size() == L && ragged_flags.size() == L && positions.size() == L),
              "ragged, ragged_flags and positions must be empty or have ", L, " entries");
  TORCH_CHECK(start >= 0 && pos >= start, "the attended span [", start, ", ", pos, "] is empty");
  const int64_t T = pos + 1 - start;
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && H / Hkv <= accel::cpu::kMaxGroup, "bad head counts H=", H,
              " Hkv=", Hkv);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B),
              "cos/sin must be contiguous float32 [1 or B, head_dim]");
  const int64_t D = cos.size(1);
  torch::Tensor valid_c;
  const uint8_t* valid_p = nullptr;
  if (valid.has_value() && valid->defined()) {
    valid_c = valid->to(torch::kUInt8).contiguous();
    TORCH_CHECK(valid_c.dim() == 2 && valid_c.size(0) == B && valid_c.size(1) == T, "valid must be [B, ", T, "]");
    valid_p = valid_c.data_ptr<uint8_t>();
  }
  const int64_t BH = B * Hkv;
  TORCH_CHECK(quest.empty() || (quest.size() == L && quest_args.size() == 4 * L),
              "quest must be empty or have ", L, " entries, quest_args ", 4 * L);
  torch::Tensor first_c;
  if (first.has_value() && first->defined()) {
    first_c = first->to(torch::kInt64).contiguous();
    TORCH_CHECK(first_c.numel() == B, "first must have ", B, " entries");
  }
  std::vector<QuestStackLayer> qss(L);
  std::vector<char> is_quest(L, 0);
  std::vector<accel::cpu::AttnInParams> ins(L);
  std::vector<accel::cpu::AttnOutParams> outs(L);
  std::vector<accel::cpu::DecodeParams> atts(L);
  std::vector<RaggedStackLayer> rgs(L);
  std::vector<char> is_ragged(L, 0);
  std::vector<float> q(B * H * D), k(BH * D), v(BH * D), a(B * H * D);
  std::vector<int32_t> lengths(BH, static_cast<int32_t>(T));
  const int nthreads = threads();
  bool room = true;
  for (size_t l = 0; l < L; ++l) {  // every argument checked before any layer runs (no half-updated cache)
    TORCH_CHECK(pre[l].size() == 9 && post[l].size() == 6, "layer ", l, ": pre needs 9 entries, post 6");
    auto& p = ins[l];
    p.M = static_cast<int>(B);
    p.C = static_cast<int>(C);
    p.H = static_cast<int>(H);
    p.Hkv = static_cast<int>(Hkv);
    p.D = static_cast<int>(D);
    p.ln = f32vec(need(pre[l][0], "input norm weight"), C, "input norm weight");
    p.eps = static_cast<float>(eps[3 * l]);
    p.wq = as_mat(need(pre[l][1], "q weight"), C, pre[l][4], "q weight");
    p.wk = as_mat(need(pre[l][2], "k weight"), C, pre[l][5], "k weight");
    p.wv = as_mat(need(pre[l][3], "v weight"), C, pre[l][6], "v weight");
    p.wq.x_bf16 = p.wk.x_bf16 = p.wv.x_bf16 = bf16_inputs;
    TORCH_CHECK(p.wq.N == H * D && p.wk.N == Hkv * D && p.wv.N == Hkv * D, "layer ", l,
                ": q/k/v weights must have ", H * D, "/", Hkv * D, "/", Hkv * D, " rows");
    p.q_norm = opt_f32vec(pre[l][7], D, "q norm weight");
    p.k_norm = opt_f32vec(pre[l][8], D, "k norm weight");
    p.qk_eps = static_cast<float>(eps[3 * l + 2]);
    p.cos = cos.data_ptr<float>();
    p.sin = sin.data_ptr<float>();
    p.cs_stride = cos.size(0) == 1 ? 0 : D;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.threads = nthreads;
    auto& o = outs[l];
    o.M = static_cast<int>(B);
    o.C = static_cast<int>(C);
    o.HD = static_cast<int>(H * D);
    o.wo = as_mat(need(post[l][0], "o weight"), H * D, post[l][1], "o weight");
    TORCH_CHECK(o.wo.N == C, "layer ", l, ": o weight must have ", C, " rows");
    o.ln = f32vec(need(post[l][2], "post-attention norm weight"), C, "post-attention norm weight");
    o.eps = static_cast<float>(eps[3 * l + 1]);
    o.wg = as_mat(need(post[l][3], "gate weight"), C, c10::nullopt, "gate weight");
    o.wu = as_mat(need(post[l][4], "up weight"), C, c10::nullopt, "up weight");
    o.I = o.wg.N;
    TORCH_CHECK(o.wu.N == o.I, "layer ", l, ": up weight must have ", o.I, " rows");
    o.wd = as_mat(need(post[l][5], "down weight"), o.I, c10::nullopt, "down weight");
    TORCH_CHECK(o.wd.N == C, "layer ", l, ": down weight must have ", C, " rows");
    o.wo.x_bf16 = bf16_inputs || dt == torch::kBFloat16;  // the attention output is rounded to bf16: exact
    o.wg.x_bf16 = o.wu.x_bf16 = o.wd.x_bf16 = bf16_inputs;
    o.a = a.data();
    o.h = h.data_ptr<float>();
    o.threads = nthreads;
    auto& d = atts[l];
    d.q = q.data();
    d.scale = static_cast<float>(scale);
    d.out = a.data();
    d.B = static_cast<int>(B); d.H = static_cast<int>(H); d.Hkv = static_cast<int>(Hkv); d.D = static_cast<int>(D);
    d.num_threads = nthreads;
    if (!ragged.empty() && !ragged[l].empty()) {
      const auto& r = ragged[l];
      const int64_t flags = ragged_flags[l];
      auto& g = rgs[l];
      g.evict = flags & 1;
      g.by_age = flags & 2;
      g.accumulate = flags & 4;
      TORCH_CHECK(r.size() == (g.evict ? 10u : 7u), "layer ", l, ": a compressed layer needs ", g.evict ? 10 : 7,
                  " tensors, got ", r.size());
      TORCH_CHECK(!k_bufs[l].has_value() && !v_bufs[l].has_value(), "layer ", l,
                  ": give either dense buffers or a compressed pool, not both");
      const auto &kp = r[0], &vp = r[1];
      for (const auto* t : {&kp, &vp})
        TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->is_contiguous() && t->size(1) == D &&
                        t->scalar_type() == dt && t->size(0) == kp.size(0),
                    "layer ", l, ": the compressed pools must be contiguous CPU [R, ", D, "] tensors in the model's dtype");
      const int64_t R = kp.size(0);
      check_meta(r[2], torch::kInt64, R, l, "pos");
      check_meta(r[3], torch::kFloat32, R, l, "score");
      check_meta(r[4], torch::kInt64, BH, l, "offsets");
      check_meta(r[5], torch::kInt32, BH, l, "lengths");
      check_meta(r[6], torch::kInt64, BH, l, "caps");
      g.k = static_cast<char*>(kp.data_ptr());
      g.v = static_cast<char*>(vp.data_ptr());
      g.kb = D * kp.element_size();
      g.vb = D * vp.element_size();
      g.pos = r[2].data_ptr<int64_t>();
      g.score = r[3].data_ptr<float>();
      g.off = r[4].data_ptr<int64_t>();
      g.len = r[5].data_ptr<int32_t>();
      g.cap = r[6].data_ptr<int64_t>();
      for (int64_t bh = 0; bh < BH; ++bh)
        TORCH_CHECK(g.off[bh] >= 0 && g.len[bh] >= 0 && g.len[bh] <= g.cap[bh] && g.off[bh] + g.cap[bh] <= R, "layer ",
                    l, ": head ", bh, " lies outside the pool");
      if (g.evict) {
        check_meta(r[7], torch::kInt64, BH, l, "budget");
        check_meta(r[8], torch::kInt64, BH, l, "sink_end");
        check_meta(r[9], torch::kInt64, BH, l, "recent");
        g.budget = r[7].data_ptr<int64_t>();
        g.sink_end = r[8].data_ptr<int64_t>();
        g.recent = r[9].data_ptr<int64_t>();
      }
      TORCH_CHECK(quest.empty() || quest[l].empty(), "layer ", l, ": quest selection runs over dense buffers only");
      g.position = positions[l];
      room = room && accel::cpu::ragged_has_room(g.len, g.cap, BH);
      is_ragged[l] = 1;
      d.k = g.k;
      d.v = g.v;
      d.k_sb = d.k_sh = d.v_sb = d.v_sh = 0;
      d.k_st = d.v_st = D;
      d.lengths = g.len;
      d.offsets = g.off;
      continue;
    }
    const auto& kb = need(k_bufs[l], "k buffer");
    const auto& vb = need(v_bufs[l], "v buffer");
    for (const auto* t : {&kb, &vb}) {
      TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv && t->size(3) == D &&
                      t->stride(3) == 1 && t->scalar_type() == dt,
                  "layer ", l, ": cache buffers must be CPU [", B, ", ", Hkv, ", capacity, ", D, "] in the model's dtype, "
                  "contiguous in the head dimension");
      TORCH_CHECK(pos < t->size(2), "layer ", l, ": cache position ", pos, " is past the buffer's capacity ", t->size(2));
    }
    d.k = static_cast<const char*>(kb.data_ptr()) + start * kb.stride(2) * kb.element_size();
    d.v = static_cast<const char*>(vb.data_ptr()) + start * vb.stride(2) * vb.element_size();
    d.k_sb = kb.stride(0); d.k_sh = kb.stride(1); d.k_st = kb.stride(2);
    d.v_sb = vb.stride(0); d.v_sh = vb.stride(1); d.v_st = vb.stride(2);
    d.lengths = lengths.data();
    d.valid = valid_p;
    d.valid_sb = T;
    d.valid_len = valid_p ? T : 0;
    if (!quest.empty() && !quest[l].empty()) {  // a Quest layer: page summaries [B, Hkv, >= pages, D] float32 or bf16
      TORCH_CHECK(quest[l].size() == 2, "layer ", l, ": quest needs (kmin, kmax)");
      const auto &mn = quest[l][0], &mx = quest[l][1];
      auto& g = qss[l];
      g.full_pages = quest_args[4 * l];
      g.k_pages = quest_args[4 * l + 1];
      g.page = quest_args[4 * l + 2];
      g.agg = static_cast<int>(quest_args[4 * l + 3]);
      g.T = T;
      const int64_t n_pages = g.page >= 1 ? (T + g.page - 1) / g.page : 0;
      TORCH_CHECK(g.page >= 1 && g.k_pages >= 1 && g.k_pages < n_pages && g.full_pages >= 0 &&
                      g.full_pages <= T / g.page && g.agg >= 0 && g.agg <= 3,
                  "layer ", l, ": bad quest arguments (full pages ", g.full_pages, ", pages ", g.k_pages, " of ",
                  n_pages, ", page ", g.page, ", agg ", g.agg, ")");
      for (const auto* t : {&mn, &mx})
        TORCH_CHECK(t->device().is_cpu() &&
                        (t->scalar_type() == torch::kFloat32 || t->scalar_type() == torch::kBFloat16) &&
                        t->scalar_type() == mn.scalar_type() && t->dim() == 4 && t->size(0) == B &&
                        t->size(1) == Hkv && t->size(2) >= n_pages && t->size(3) == D && t->stride(3) == 1 &&
                        t->strides() == mn.strides(),
                    "layer ", l, ": quest summaries must be CPU float32 or bfloat16 (both alike) [", B, ", ", Hkv,
                    ", >= ", n_pages, ", ", D, "], contiguous in D, with one set of strides");
      g.bf16 = mn.scalar_type() == torch::kBFloat16;
      g.kmin = mn.data_ptr();
      g.kmax = mx.data_ptr();
      g.sb = mn.stride(0); g.sh = mn.stride(1); g.sp = mn.stride(2);
      g.first = first_c.defined() ? first_c.data_ptr<int64_t>() : nullptr;
      // agg none: room for the union of the G query heads' pages per (sequence, KV head), idx [B, Hkv, G * width]
      // with a head mask alike, counts [B, Hkv]
      const int64_t sel = g.agg == 3 ? H / Hkv : 1;
      g.idx.resize(static_cast<size_t>(sel * BH * g.k_pages * g.page));
      g.counts.resize(static_cast<size_t>(BH));
      if (g.agg == 3) g.umask.resize(g.idx.size());
      is_quest[l] = 1;
    }
  }
  if (!room) return {};
  int64_t rows = 0;
  {
    pybind11::gil_scoped_release nogil;
    std::vector<c10::BFloat16> bf_rows;
    std::vector<c10::Half> f16_rows;
    std::vector<float> f32_rows, scores, lse;
    for (size_t l = 0; l < L; ++l) {
      auto& p = ins[l];
      p.h = h.data_ptr<float>();
      accel::cpu::attn_in(p);
      const torch::Tensor* kb = is_ragged[l] ? nullptr : &*k_bufs[l];
      const torch::Tensor* vb = is_ragged[l] ? nullptr : &*v_bufs[l];
      const RaggedStackLayer* rg = is_ragged[l] ? &rgs[l] : nullptr;
      QuestStackLayer* qs = is_quest[l] ? &qss[l] : nullptr;
      if (dt == torch::kBFloat16)
        rows += stack_layer_attention<c10::BFloat16, uint16_t>(q, k, v, a, kb, vb, rg, qs, B, Hkv, D, pos, atts[l], bf_rows,
                                                               scores, lse);
      else if (dt == torch::kHalf)
        rows += stack_layer_attention<c10::Half, accel::cpu::f16>(q, k, v, a, kb, vb, rg, qs, B, Hkv, D, pos, atts[l],
                                                                  f16_rows, scores, lse);
      else
        rows += stack_layer_attention<float, float>(q, k, v, a, kb, vb, rg, qs, B, Hkv, D, pos, atts[l], f32_rows, scores,
                                                    lse);
      accel::cpu::attn_out_mlp(outs[l]);
      if (dt == torch::kBFloat16) round_inplace<c10::BFloat16>(h.data_ptr<float>(), B * C);
      else if (dt == torch::kHalf) round_inplace<c10::Half>(h.data_ptr<float>(), B * C);
    }
  }
  return {dt == torch::kFloat32 ? h : h.to(dt), torch::tensor(rows, torch::dtype(torch::kInt64))};
}
