// Decode-time bookkeeping of accel's ragged (compressed) KV cache: per-step eviction and attention
// accumulation, one call per layer instead of a chain of small torch ops (which cost more than the
// attention itself over a compressed cache). Layout and semantics: python/accel/cache/ragged.py.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "accel/cpu/ragged_kv.h"

namespace {

void check_1d(const torch::Tensor& t, torch::ScalarType st, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == st, name,
              " must be a contiguous CPU tensor of dtype ", st, ", got ", t.scalar_type());
}

}  // namespace

// Evict every head down to its budget: while lengths[bh] > budget[bh], the victim is the live row with
// the lowest score (by_age: the oldest position) that is neither a sink (pos < sink_end) nor among the
// `recent` newest positions; if every live row is protected, the oldest non-sink row, else the oldest
// row. The head's last live row moves into the victim's slot (K, V, pos, score). Returns rows moved.
int64_t ragged_evict_cpu(torch::Tensor k, torch::Tensor v, torch::Tensor pos, torch::Tensor score,
                         torch::Tensor offsets, torch::Tensor lengths, torch::Tensor budget, torch::Tensor sink_end,
                         torch::Tensor recent, bool by_age) {
  TORCH_CHECK(k.dim() == 2 && v.dim() == 2 && k.is_contiguous() && v.is_contiguous() && k.size(0) == v.size(0),
              "k and v must be contiguous [R, D] row pools");
  check_1d(pos, torch::kInt64, "pos");
  check_1d(score, torch::kFloat32, "score");
  check_1d(offsets, torch::kInt64, "offsets");
  check_1d(lengths, torch::kInt32, "lengths");
  check_1d(budget, torch::kInt64, "budget");
  check_1d(sink_end, torch::kInt64, "sink_end");
  check_1d(recent, torch::kInt64, "recent");
  const int64_t BH = offsets.numel(), R = k.size(0);
  TORCH_CHECK(lengths.numel() == BH && budget.numel() == BH && sink_end.numel() == BH && recent.numel() == BH,
              "per-head tensors must have B*Hkv entries");
  TORCH_CHECK(pos.numel() == R && score.numel() == R, "pos/score must have one entry per pool row");
  const int64_t kb = k.size(1) * k.element_size(), vb = v.size(1) * v.element_size();
  char* kp = static_cast<char*>(k.data_ptr());
  char* vp = static_cast<char*>(v.data_ptr());
  int64_t* ps = pos.data_ptr<int64_t>();
  float* sc = score.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  int32_t* len = lengths.data_ptr<int32_t>();
  const int64_t* bud = budget.data_ptr<int64_t>();
  const int64_t* se = sink_end.data_ptr<int64_t>();
  const int64_t* rc = recent.data_ptr<int64_t>();
  for (int64_t bh = 0; bh < BH; ++bh)
    TORCH_CHECK(off[bh] >= 0 && off[bh] + len[bh] <= R, "head ", bh, " lies outside the pool");
  return accel::cpu::ragged_evict_rows(kp, vp, kb, vb, ps, sc, off, len, bud, se, rc, BH, by_age);
}

// score[offsets[bh] + t] += mean over the G query heads of head bh of exp(logits[b, h, t] - lse[b, h]),
// for t < lengths[bh] (H2O-style accumulated attention; logits from the decode kernel's scores output).
void ragged_accumulate_cpu(torch::Tensor logits, torch::Tensor lse, torch::Tensor offsets, torch::Tensor lengths,
                           torch::Tensor score) {
  check_1d(lse, torch::kFloat32, "lse");
  check_1d(offsets, torch::kInt64, "offsets");
  check_1d(lengths, torch::kInt32, "lengths");
  check_1d(score, torch::kFloat32, "score");
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous() && logits.scalar_type() == torch::kFloat32,
              "logits must be a contiguous float32 [B, H, W] tensor");
  const int64_t B = logits.size(0), H = logits.size(1), W = logits.size(2), BH = offsets.numel();
  TORCH_CHECK(BH % B == 0 && H % (BH / B) == 0 && lse.numel() == B * H, "shapes of logits/lse/offsets disagree");
  const int64_t Hkv = BH / B, G = H / Hkv;
  const float* lg = logits.data_ptr<float>();
  const float* ls = lse.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  float* sc = score.data_ptr<float>();
  for (int64_t bh = 0; bh < BH; ++bh)
    TORCH_CHECK(len[bh] <= W && off[bh] + len[bh] <= score.numel(), "head ", bh, " exceeds the logits or the pool");
  accel::cpu::ragged_accumulate_rows(lg, W, ls, off, len, sc, B, H, Hkv);
}

// Append one token per head at the end of its live rows (new_k/new_v [B*Hkv, D], same dtype as the
// pool). Returns false, writing nothing, if some head has no spare row (the caller grows the pool).
bool ragged_append_cpu(torch::Tensor k, torch::Tensor v, torch::Tensor pos, torch::Tensor score, torch::Tensor offsets,
                       torch::Tensor lengths, torch::Tensor caps, torch::Tensor new_k, torch::Tensor new_v,
                       int64_t position) {
  TORCH_CHECK(k.dim() == 2 && v.dim() == 2 && k.is_contiguous() && v.is_contiguous(), "k/v must be contiguous pools");
  check_1d(pos, torch::kInt64, "pos");
  check_1d(score, torch::kFloat32, "score");
  check_1d(offsets, torch::kInt64, "offsets");
  check_1d(lengths, torch::kInt32, "lengths");
  check_1d(caps, torch::kInt64, "caps");
  const int64_t BH = offsets.numel(), R = k.size(0);
  TORCH_CHECK(new_k.dim() == 2 && new_k.size(0) == BH && new_k.size(1) == k.size(1) && new_k.is_contiguous() &&
                  new_k.scalar_type() == k.scalar_type(),
              "new_k must be a contiguous [B*Hkv, D] tensor of the pool's dtype");
  TORCH_CHECK(new_v.dim() == 2 && new_v.size(0) == BH && new_v.size(1) == v.size(1) && new_v.is_contiguous() &&
                  new_v.scalar_type() == v.scalar_type(),
              "new_v must be a contiguous [B*Hkv, D] tensor of the pool's dtype");
  const int64_t* off = offsets.data_ptr<int64_t>();
  int32_t* len = lengths.data_ptr<int32_t>();
  const int64_t* cap = caps.data_ptr<int64_t>();
  for (int64_t bh = 0; bh < BH; ++bh) TORCH_CHECK(off[bh] + cap[bh] <= R, "head ", bh, " lies outside the pool");
  if (!accel::cpu::ragged_has_room(len, cap, BH)) return false;
  const int64_t kb = k.size(1) * k.element_size(), vb = v.size(1) * v.element_size();
  accel::cpu::ragged_append_rows(static_cast<char*>(k.data_ptr()), static_cast<char*>(v.data_ptr()), kb, vb,
                                 pos.data_ptr<int64_t>(), score.data_ptr<float>(), off, len,
                                 static_cast<const char*>(new_k.data_ptr()), static_cast<const char*>(new_v.data_ptr()),
                                 BH, position);
  return true;
}

// Positions -> the rows of each head that hold them (layer-reuse decode over a compressed cache): for
// head bh, the selected absolute positions idx[b, hs, :counts[b, hs]] (hs = h, or 0 for one set shared
// by the layer) that the head still keeps, as slot numbers inside its segment, ascending; -1 padded.
// A per-head table of T entries is filled from the head's rows (pos[offsets[bh] + i]) and probed once
// per selected position: O(T + kept + selected) per head, no sorting.
std::vector<torch::Tensor> ragged_positions_to_slots_cpu(torch::Tensor pos, torch::Tensor offsets,
                                                         torch::Tensor lengths, torch::Tensor idx,
                                                         torch::Tensor counts, int64_t T) {
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.is_contiguous(), "pos must be contiguous int64 [R]");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(), "offsets must be contiguous int64");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt32 && lengths.is_contiguous(), "lengths must be contiguous int32");
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 && idx.dim() == 3, "idx must be int32 [B, Hs, n]");
  idx = idx.contiguous();
  counts = counts.to(torch::kInt32).contiguous();
  const int64_t BH = offsets.numel(), B = idx.size(0), Hs = idx.size(1), n = idx.size(2);
  TORCH_CHECK(B > 0 && BH % B == 0, "offsets must hold B * Hkv entries");
  const int64_t Hkv = BH / B;
  TORCH_CHECK(Hs == Hkv || Hs == 1, "idx must have Hkv or 1 sets per sequence");
  TORCH_CHECK(counts.numel() == B * Hs, "counts must be [B, Hs]");
  TORCH_CHECK(T >= 0, "T must be >= 0");
  auto slots = torch::full({B, Hkv, std::max<int64_t>(n, 1)}, -1, torch::dtype(torch::kInt32));
  auto out_n = torch::zeros({B, Hkv}, torch::dtype(torch::kInt32));
  const int64_t* P = pos.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int32_t* I = idx.data_ptr<int32_t>();
  const int32_t* C = counts.data_ptr<int32_t>();
  int32_t* S = slots.data_ptr<int32_t>();
  int32_t* N = out_n.data_ptr<int32_t>();
  const int64_t R = pos.numel();
  std::vector<int32_t> table(static_cast<size_t>(T) + 1);
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / Hkv, h = bh % Hkv, hs = Hs == 1 ? 0 : h;
    std::fill(table.begin(), table.end(), -1);
    TORCH_CHECK(off[bh] >= 0 && off[bh] + len[bh] <= R, "offsets/lengths point outside the row pool");
    for (int32_t i = 0; i < len[bh]; ++i) {
      const int64_t p = P[off[bh] + i];
      if (p >= 0 && p < T) table[p] = i;
    }
    const int32_t* sel = I + (b * Hs + hs) * n;
    const int32_t c = std::min<int32_t>(C[b * Hs + hs], static_cast<int32_t>(n));
    int32_t* dst = S + bh * std::max<int64_t>(n, 1);
    int32_t m = 0;
    for (int32_t j = 0; j < c; ++j) {
      const int32_t p = sel[j];
      if (p >= 0 && p < T && table[p] >= 0) dst[m++] = table[p];
    }
    std::sort(dst, dst + m);  // ascending rows: runs of neighbouring rows read as runs
    N[bh] = m;
  }
  return {slots, out_n};
}
