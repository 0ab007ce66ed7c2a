// Torch-facing launchers for token selection and block-sparse prefill (CPU).
#include <torch/extension.h>

#include "accel/cpu/block_sparse_prefill.h"
#include "accel/cpu/hip.h"
#include "accel/cpu/quest.h"
#include "accel/cpu/select.h"

namespace {
void check_cache(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be [B, Hkv, T, D] contiguous in D");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16 ||
                  t.scalar_type() == torch::kHalf,
              name, " must be float32, bfloat16 or float16");
}
}  // namespace

std::vector<torch::Tensor> select_topk_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor lengths, int64_t budget,
                                           int64_t agg, int64_t chunk, int64_t sink, int64_t recent, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D]");
  q = q.to(torch::kFloat32).contiguous();
  check_cache(k, "k");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k must be [B, Hkv, T, D] matching q");
  TORCH_CHECK(H % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(agg >= 0 && agg <= 3, "agg must be 0 (max), 1 (mean), 2 (sum) or 3 (shared)");
  TORCH_CHECK(chunk >= 1 && budget >= 1 && sink >= 0 && recent >= 0, "chunk/budget must be >= 1, sink/recent >= 0");
  lengths = lengths.to(torch::kInt32).contiguous();
  TORCH_CHECK(lengths.numel() == B, "lengths must have B entries");
  int32_t max_len = 0;  // a plain loop: torch reductions cost tens of microseconds per call from cold caches
  for (int64_t b = 0; b < B; ++b) {
    const int32_t L = lengths.data_ptr<int32_t>()[b];
    TORCH_CHECK(L >= 0 && L <= k.size(2), "lengths[", b, "] = ", L, " is outside [0, cache length ", k.size(2), "]");
    max_len = std::max(max_len, L);
  }
  const int64_t n_chunks = (max_len + chunk - 1) / chunk;
  const int64_t max_sel = std::min<int64_t>(max_len, (std::max<int64_t>(budget / chunk, 1) +
                                                      (sink + chunk - 1) / chunk + recent / chunk + 2) * chunk);
  const int64_t cap = budget >= max_len ? std::max<int64_t>(max_len, 1) : std::max<int64_t>(std::min<int64_t>(max_sel, n_chunks * chunk), 1);
  const int64_t Hsel = agg == 3 ? 1 : Hkv;
  auto out = torch::empty({B, Hsel, cap}, torch::dtype(torch::kInt32));
  auto counts = torch::empty({B, Hsel}, torch::dtype(torch::kInt32));
  accel::cpu::SelectParams p;
  p.q = q.data_ptr<float>(); p.k = k.data_ptr();
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.lengths = lengths.data_ptr<int32_t>();
  p.B = B; p.H = H; p.Hkv = Hkv; p.D = D; p.scale = static_cast<float>(scale);
  p.agg = static_cast<accel::cpu::Agg>(agg);
  p.chunk = chunk; p.sink = sink; p.recent = recent; p.budget = budget;
  p.out = out.data_ptr<int32_t>(); p.counts = counts.data_ptr<int32_t>(); p.max_sel = cap;
  {
    pybind11::gil_scoped_release nogil;
    if (k.scalar_type() == torch::kFloat32) accel::cpu::select_topk<float>(p);
    else if (k.scalar_type() == torch::kHalf) accel::cpu::select_topk<accel::cpu::f16>(p);
    else accel::cpu::select_topk<uint16_t>(p);
  }
  return {out, counts};
}

std::vector<torch::Tensor> select_from_logits_cpu(torch::Tensor scores, torch::Tensor lse, int64_t T, int64_t num_kv_heads,
                                                  int64_t budget, int64_t agg, int64_t chunk, int64_t sink,
                                                  int64_t recent, c10::optional<torch::Tensor> first) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == torch::kFloat32 && scores.dim() == 3 &&
                  scores.stride(2) == 1, "scores must be a CPU float32 [B, H, >=T] tensor contiguous in T");
  const int64_t B = scores.size(0), H = scores.size(1);
  TORCH_CHECK(scores.stride(0) == H * scores.stride(1), "scores must be contiguous over [B, H]");
  TORCH_CHECK(T >= 1 && T <= scores.size(2), "T must be in [1, scores.size(2)]");
  TORCH_CHECK(num_kv_heads >= 1 && H % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(agg >= 0 && agg <= 3, "agg must be 0 (max), 1 (mean), 2 (sum) or 3 (shared)");
  TORCH_CHECK(chunk >= 1 && budget >= 1 && sink >= 0 && recent >= 0, "chunk/budget must be >= 1, sink/recent >= 0");
  lse = lse.to(torch::kFloat32).contiguous();
  TORCH_CHECK(lse.numel() == B * H, "lse must be [B, H]");
  torch::Tensor fv;
  if (first.has_value() && first->defined()) {
    fv = first->to(torch::kInt64).contiguous();
    TORCH_CHECK(fv.numel() == B, "first_valid must have B entries");
  }
  const int64_t n_chunks = (T + chunk - 1) / chunk;
  // forced sink chunks (one more when the sink starts mid-chunk), recent chunks, and the budget's chunks
  const int64_t kc_max = std::min<int64_t>(n_chunks, std::max<int64_t>(budget / chunk, 1) + (sink + chunk - 1) / chunk + 1 +
                                                         recent / chunk + 1);
  const int64_t cap = budget >= T ? T : std::min<int64_t>(T, kc_max * chunk);
  const int64_t Hsel = agg == 3 ? 1 : num_kv_heads;
  auto out = torch::empty({B, Hsel, std::max<int64_t>(cap, 1)}, torch::dtype(torch::kInt32));
  auto counts = torch::empty({B, Hsel}, torch::dtype(torch::kInt32));
  accel::cpu::LogitSelectParams p;
  p.scores = scores.data_ptr<float>(); p.stride = scores.stride(1); p.lse = lse.data_ptr<float>();
  p.first = fv.defined() ? fv.data_ptr<int64_t>() : nullptr;
  p.T = T; p.B = B; p.H = H; p.Hkv = num_kv_heads; p.agg = static_cast<accel::cpu::Agg>(agg);
  p.chunk = chunk; p.sink = sink; p.recent = recent; p.budget = budget;
  p.out = out.data_ptr<int32_t>(); p.counts = counts.data_ptr<int32_t>(); p.max_sel = std::max<int64_t>(cap, 1);
  {
    pybind11::gil_scoped_release nogil;
    accel::cpu::select_from_logits(p);
  }
  return {out, counts};
}

torch::Tensor block_sparse_prefill_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor blocks,
                                       torch::Tensor counts, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, H, Tq, D]");
  q = q.to(torch::kFloat32).contiguous();
  check_cache(k, "k");
  check_cache(v, "v");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(D <= 256, "head_dim up to 256 is supported, got ", D);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D, "k/v shapes must match q");
  TORCH_CHECK(H % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(Tq <= Tk, "more queries than keys");
  const int64_t nqb = (Tq + accel::cpu::kBS - 1) / accel::cpu::kBS;
  blocks = blocks.to(torch::kInt32).contiguous();
  counts = counts.to(torch::kInt32).contiguous();
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(0) == H && blocks.size(1) == nqb,
              "blocks must be [H, n_query_blocks=", nqb, ", max_kblocks]");
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == H && counts.size(1) == nqb, "counts must be [H, n_query_blocks]");
  for (int64_t i = 0; i < counts.numel(); ++i)
    TORCH_CHECK(counts.data_ptr<int32_t>()[i] >= 0 && counts.data_ptr<int32_t>()[i] <= blocks.size(2),
                "counts exceed the block lists (entry ", i, " = ", counts.data_ptr<int32_t>()[i], ")");
  auto out = torch::empty({B, H, Tq, D}, q.options());
  accel::cpu::BlockSparseParams p;
  p.q = q.data_ptr<float>(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
  p.blocks = blocks.data_ptr<int32_t>(); p.counts = counts.data_ptr<int32_t>(); p.max_kb = blocks.size(2);
  p.B = B; p.H = H; p.Hkv = Hkv; p.D = D; p.Tq = Tq; p.Tk = Tk; p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  {
    pybind11::gil_scoped_release nogil;
    if (k.scalar_type() == torch::kFloat32) accel::cpu::block_sparse_prefill<float>(p);
    else if (k.scalar_type() == torch::kHalf) accel::cpu::block_sparse_prefill<accel::cpu::f16>(p);
    else accel::cpu::block_sparse_prefill<uint16_t>(p);
  }
  return out;
}

// Quest's page selection (accel/cpu/quest.h): q [B, H, D]; kmin / kmax [B, Hkv, >= n_pages, D] float32 or bfloat16 page
// summaries (contiguous in D); first: optional [B] int64 first real position. Returns (positions [B, Hkv,
// k_pages * page] int32, -1 padded; counts [B, Hkv] int32); agg 3 (each query head selects alone, one pass over the
// summaries): positions [G, B, Hkv, k_pages * page] and counts [G, B, Hkv], query head kh * G + g at [g, b, kh]; agg 3
// with `merged`: the union of each group's G selections, (positions [B, Hkv, G * k_pages * page] ascending, -1 padded,
// counts [B, Hkv], head_mask [B, Hkv, G * k_pages * page] int64, bit g where query head kh * G + g selected the
// position), the arguments of decode_attention's head_mask.
std::vector<torch::Tensor> quest_select_cpu(torch::Tensor q, torch::Tensor kmin, torch::Tensor kmax, int64_t n_pages,
                                            int64_t k_pages, int64_t page, int64_t T, int64_t agg,
                                            c10::optional<torch::Tensor> first, bool merged) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3, "q must be a CPU [B, H, D] tensor");
  q = q.to(torch::kFloat32).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  for (const auto* t : {&kmin, &kmax})
    TORCH_CHECK(t->device().is_cpu() &&
                    (t->scalar_type() == torch::kFloat32 || t->scalar_type() == torch::kBFloat16) &&
                    t->scalar_type() == kmin.scalar_type() && t->dim() == 4 && t->size(0) == B && t->size(3) == D &&
                    t->stride(3) == 1,
                "kmin/kmax must be CPU float32 or bfloat16 (both alike) [B, Hkv, pages, D] contiguous in D");
  TORCH_CHECK(kmin.sizes() == kmax.sizes(), "kmin and kmax must have the same shape");
  if (kmin.strides() != kmax.strides()) {  // one set of strides for both (the summaries' buffers already share one)
    kmin = kmin.contiguous();
    kmax = kmax.contiguous();
  }
  const int64_t Hkv = kmin.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads ", H, " must be a multiple of KV heads ", Hkv);
  TORCH_CHECK(page >= 1 && n_pages >= 1 && n_pages <= kmin.size(2) && k_pages >= 1, "need 1 <= n_pages <= ",
              kmin.size(2), ", k_pages >= 1, page >= 1");
  TORCH_CHECK(T > (n_pages - 1) * page && T <= n_pages * page, "T = ", T, " does not end in the last of ", n_pages,
              " pages of ", page);
  TORCH_CHECK(agg >= 0 && agg <= 3, "agg must be 0 (max), 1 (mean), 2 (sum) or 3 (none)");
  TORCH_CHECK(!merged || (agg == 3 && H / Hkv <= 64), "merged needs agg 3 (none) and at most 64 query heads per KV head");
  torch::Tensor first_c;
  accel::cpu::QuestParams p;
  if (first.has_value() && first->defined()) {
    first_c = first->to(torch::kInt64).contiguous();
    TORCH_CHECK(first_c.numel() == B, "first must have B entries");
    p.first = first_c.data_ptr<int64_t>();
  }
  const int64_t k = std::min(k_pages, n_pages);
  const int64_t G = H / Hkv;
  auto out = merged     ? torch::empty({B, Hkv, G * k * page}, torch::dtype(torch::kInt32))
             : agg == 3 ? torch::empty({G, B, Hkv, k * page}, torch::dtype(torch::kInt32))
                        : torch::empty({B, Hkv, k * page}, torch::dtype(torch::kInt32));
  auto counts = agg == 3 && !merged ? torch::empty({G, B, Hkv}, torch::dtype(torch::kInt32))
                                    : torch::empty({B, Hkv}, torch::dtype(torch::kInt32));
  torch::Tensor head_mask;
  if (merged) {
    head_mask = torch::empty({B, Hkv, G * k * page}, torch::dtype(torch::kInt64));
    p.head_mask = reinterpret_cast<uint64_t*>(head_mask.data_ptr<int64_t>());
  }
  p.q = q.data_ptr<float>();
  p.kmin = kmin.data_ptr();
  p.kmax = kmax.data_ptr();
  p.bf16 = kmin.scalar_type() == torch::kBFloat16;
  p.sb = kmin.stride(0); p.sh = kmin.stride(1); p.sp = kmin.stride(2);
  p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.Hkv = static_cast<int>(Hkv); p.D = static_cast<int>(D);
  p.n_pages = n_pages; p.k_pages = k; p.page = page; p.T = T; p.agg = static_cast<int>(agg);
  p.out = out.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  {
    pybind11::gil_scoped_release nogil;
    accel::cpu::quest_select(p);
  }
  if (merged) return {out, counts, head_mask};
  return {out, counts};
}

// HiP's branch search (accel/cpu/hip.h): q [B, H, D]; k [B, Hkv, T, D] (float32 / bfloat16 / float16, contiguous in
// D); lo / hi [B, Hkv, n] int64 branches to refine; first / start [B] int64. Returns (lo, hi, coarse_lo, coarse_hi,
// positions [B, Hkv, sink + n * key_block + window] int32 -1 padded, counts [B, Hkv] int32, reads [B, Hkv] int64:
// the key rows the search scored); coarse_* are empty unless coarse_at > 0.
std::vector<torch::Tensor> hip_search_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor lo, torch::Tensor hi,
                                          int64_t key_block, int64_t rep, double scale, int64_t coarse_at,
                                          torch::Tensor first, torch::Tensor start, int64_t sink, int64_t window,
                                          bool aligned, int64_t rep_keys) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3, "q must be a CPU [B, H, D] tensor");
  q = q.to(torch::kFloat32).contiguous();
  check_cache(k, "k");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0, "k must be [B, Hkv, T, D] matching q");
  TORCH_CHECK(T >= 1, "k holds no tokens");
  lo = lo.to(torch::kInt64).contiguous();
  hi = hi.to(torch::kInt64).contiguous();
  TORCH_CHECK(lo.dim() == 3 && lo.size(0) == B && lo.size(1) == Hkv && lo.sizes() == hi.sizes(),
              "lo / hi must be [B, Hkv, n]");
  first = first.to(torch::kInt64).contiguous();
  start = start.to(torch::kInt64).contiguous();
  TORCH_CHECK(first.numel() == B && start.numel() == B, "first / start must have B entries");
  TORCH_CHECK(key_block >= 1 && (rep == 0 || rep == 1) && sink >= 0 && window >= 0 && rep_keys >= 1,
              "need key_block >= 1, rep 0 (middle) or 1 (first), sink and window >= 0, rep_keys >= 1");
  const int64_t n = lo.size(2);
  const int64_t width = sink + n * key_block + window;
  auto lo_out = torch::empty_like(lo), hi_out = torch::empty_like(hi);
  auto c_lo = coarse_at > 0 ? torch::empty_like(lo) : torch::empty({0}, lo.options());
  auto c_hi = coarse_at > 0 ? torch::empty_like(hi) : torch::empty({0}, hi.options());
  auto idx = torch::empty({B, Hkv, width}, torch::dtype(torch::kInt32));
  auto counts = torch::empty({B, Hkv}, torch::dtype(torch::kInt32));
  auto reads = torch::zeros({B, Hkv}, torch::dtype(torch::kInt64));
  accel::cpu::HipParams p;
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr();
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.Hkv = static_cast<int>(Hkv); p.D = static_cast<int>(D);
  p.T = T;
  p.lo = lo.data_ptr<int64_t>(); p.hi = hi.data_ptr<int64_t>();
  p.n = static_cast<int>(n); p.key_block = static_cast<int>(key_block); p.rep = static_cast<int>(rep);
  p.aligned = aligned;
  p.rep_keys = rep_keys;
  p.scale = static_cast<float>(scale);
  p.coarse_at = coarse_at;
  p.lo_out = lo_out.data_ptr<int64_t>(); p.hi_out = hi_out.data_ptr<int64_t>();
  if (coarse_at > 0) {
    p.coarse_lo = c_lo.data_ptr<int64_t>();
    p.coarse_hi = c_hi.data_ptr<int64_t>();
  }
  p.first = first.data_ptr<int64_t>(); p.start = start.data_ptr<int64_t>();
  p.sink = static_cast<int>(sink); p.window = window;
  p.idx = idx.data_ptr<int32_t>(); p.width = width; p.counts = counts.data_ptr<int32_t>();
  p.reads = reads.data_ptr<int64_t>();
  {
    pybind11::gil_scoped_release nogil;
    if (k.scalar_type() == torch::kFloat32) accel::cpu::hip_search<float>(p);
    else if (k.scalar_type() == torch::kHalf) accel::cpu::hip_search<accel::cpu::f16>(p);
    else accel::cpu::hip_search<uint16_t>(p);
  }
  return {lo_out, hi_out, c_lo, c_hi, idx, counts, reads};
}
