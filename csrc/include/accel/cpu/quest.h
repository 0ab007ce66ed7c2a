// Quest's page selection for one decode step, CPU (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient
// Long-Context LLM Inference", arXiv 2406.10774). Torch-free.
//
// Per (sequence, KV head): the upper bound U_j = sum_d max(q_d M_jd, q_d m_jd) of every page j from its key min m_j
// and max M_j (accel.cache.quest.QuestMetadata keeps them), for each query head of the GQA group, aggregated over the
// group (max / mean / sum); pages holding only left padding rank last (-inf), the current (last) page first (+inf);
// the k_pages highest (ties: the lower page) are expanded to their token positions below T, ascending. One call
// replaces the ~20 small torch operations per layer of the same selection (accel.policies.quest's torch path).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "accel/cpu/vec_math.h"

namespace accel {
namespace cpu {

struct QuestParams {
  const float* q = nullptr;  // [B, H, D] fp32
  const void* kmin = nullptr;  // page summaries, fp32 or bf16 bits (bf16), (b, kh, page, d) at b*sb + kh*sh + page*sp + d
  const void* kmax = nullptr;
  bool bf16 = false;
  int64_t sb = 0, sh = 0, sp = 0;
  int B = 0, H = 0, Hkv = 0, D = 0;
  int64_t n_pages = 0, k_pages = 0, page = 16, T = 0;
  int agg = 0;  // 0 max, 1 mean, 2 sum
  const int64_t* first = nullptr;  // [B] first real (non-padding) position, or nullptr
  int32_t* out = nullptr;     // [B, Hkv, k_pages * page], -1 padded
  int32_t* counts = nullptr;  // [B, Hkv]
};

// A page summary stored in bfloat16 is rounded outward (a minimum down, a maximum up to the next bf16 value), so the
// bound computed from it stays >= q . k of every key of the page; a NaN is stored as bf16's NaN. Values that are
// already bf16 (a bf16 cache's keys) are stored exactly.
static inline uint16_t bf16_outward(float x, bool up) {
  if (x != x) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  uint16_t hi = static_cast<uint16_t>(bits >> 16);
  const bool neg = (bits >> 31) != 0;
  if ((bits & 0xFFFFu) != 0 && neg != up) ++hi;  // truncation moved toward zero; step one ulp outward
  return hi;
}

template <typename S> struct SummaryStore;
template <> struct SummaryStore<float> {
  static inline void put(float* p, float x, bool) { *p = x; }
  static inline float get(const float* p) { return *p; }
};
template <> struct SummaryStore<uint16_t> {
  static inline void put(uint16_t* p, float x, bool up) { *p = bf16_outward(x, up); }
  static inline float get(const uint16_t* p) { return bf16_to_float(*p); }
};

// Page summaries of one layer's keys for Quest's bound, updated in place as the cache grows (the same values as
// accel.cache.quest.QuestMetadata: min and max are exact in fp32, rounded outward in bf16). Keys of (b, kv head) token
// t at k + b*k_sb + kh*k_sh + t*k_st (elements of E: float, bf16 bits or f16), t < T; pages [from_page, T / page) are
// summarised into their slots (elements of S: float, or bf16 bits), and a partial last page (T % page != 0) into
// the slot after them.
template <typename E, typename S>
void quest_summarize(const E* k, int64_t k_sb, int64_t k_sh, int64_t k_st, int B, int Hkv, int D, int64_t T,
                     int64_t page, int64_t from_page, S* kmin, S* kmax, int64_t sb, int64_t sh, int64_t sp) {
  const int64_t n_full = T / page, n_pages = (T + page - 1) / page;
  if (from_page >= n_pages) return;
  std::vector<float> mn(D), mx(D);
  for (int b = 0; b < B; ++b)
    for (int kh = 0; kh < Hkv; ++kh) {
      const E* kk = k + b * k_sb + kh * k_sh;
      for (int64_t j = std::min(from_page, n_full); j < n_pages; ++j) {
        const int64_t t1 = std::min(T, (j + 1) * page);
        for (int d = 0; d < D; ++d) mn[d] = mx[d] = Load<E>::get(kk + j * page * k_st, d);
        for (int64_t t = j * page + 1; t < t1; ++t) {
          const E* row = kk + t * k_st;
          for (int d = 0; d < D; ++d) {
            const float x = Load<E>::get(row, d);
            mn[d] = (x < mn[d] || x != x) ? x : mn[d];  // a NaN key makes its page's summary NaN, as torch's amin
            mx[d] = (x > mx[d] || x != x) ? x : mx[d];
          }
        }
        S* smn = kmin + b * sb + kh * sh + j * sp;
        S* smx = kmax + b * sb + kh * sh + j * sp;
        for (int d = 0; d < D; ++d) SummaryStore<S>::put(smn + d, mn[d], false), SummaryStore<S>::put(smx + d, mx[d], true);
      }
    }
}

template <typename S>
void quest_select_t(const QuestParams& p) {
  const int G = p.H / p.Hkv;
  const int64_t width = p.k_pages * p.page;
  const float ninf = -std::numeric_limits<float>::infinity(), pinf = std::numeric_limits<float>::infinity();
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.B; ++b)
    for (int kh = 0; kh < p.Hkv; ++kh) {
      std::vector<float> qp(static_cast<size_t>(G) * p.D), qn(qp.size()), score(p.n_pages);
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < p.D; ++d) {
          const float x = p.q[(static_cast<int64_t>(b) * p.H + kh * G + g) * p.D + d];
          qp[g * p.D + d] = x > 0.f ? x : 0.f;
          qn[g * p.D + d] = x < 0.f ? x : 0.f;
        }
      const S* mn = static_cast<const S*>(p.kmin) + b * p.sb + kh * p.sh;
      const S* mx = static_cast<const S*>(p.kmax) + b * p.sb + kh * p.sh;
      const int D = p.D, agg_code = p.agg;  // locals: the loop below keeps them in registers
      const int64_t sp = p.sp, n_pages = p.n_pages;
      const float* qpp = qp.data();
      const float* qnp = qn.data();
      for (int64_t j = 0; j < n_pages; ++j) {
        const S* M = mx + j * sp;
        const S* m = mn + j * sp;
        float agg = agg_code == 0 ? ninf : 0.f;
        bool nan = false;
        for (int g = 0; g < G; ++g) {
          const float* a = qpp + g * D;
          const float* c = qnp + g * D;
          float u = 0.f;
          int d = 0;
          if (D >= 16) {
            v16f s{};
            for (; d + 16 <= D; d += 16) s += load16(a + d) * load16(M + d) + load16(c + d) * load16(m + d);
            u = hsum16(s);
          }
          for (; d < D; ++d) u += a[d] * SummaryStore<S>::get(M + d) + c[d] * SummaryStore<S>::get(m + d);
          nan |= u != u;  // NaN keys: the bound is NaN (torch's amax would propagate it)
          agg = agg_code == 0 ? (u > agg ? u : agg) : agg + u;
        }
        nan = nan || agg != agg;  // NaN keys, or +inf and -inf bounds summed
        // a NaN bound ranks first (torch's topk puts NaN first; among NaN and +inf bounds either order is a tie)
        score[j] = nan ? pinf : agg_code == 1 ? agg / static_cast<float>(G) : agg;
      }
      if (p.first)
        for (int64_t j = 0; j < p.n_pages && (j + 1) * p.page <= p.first[b]; ++j) score[j] = ninf;
      // the current (last) page always, then the k - 1 first of the others in (score descending, page ascending),
      // a strict total order: the same set as a full sort
      std::vector<int64_t> order(p.n_pages);
      std::iota(order.begin(), order.end(), 0);
      const int64_t k = std::max<int64_t>(1, std::min(p.k_pages, p.n_pages)), others = p.n_pages - 1;
      if (k - 1 > 0 && k - 1 < others)
        std::nth_element(order.begin(), order.begin() + (k - 2), order.begin() + others, [&](int64_t x, int64_t y) {
          return score[x] > score[y] || (score[x] == score[y] && x < y);
        });
      order[k - 1] = p.n_pages - 1;
      std::sort(order.begin(), order.begin() + k);
      int32_t* out = p.out + (static_cast<int64_t>(b) * p.Hkv + kh) * width;
      int64_t n = 0;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t t = order[i] * p.page; t < (order[i] + 1) * p.page && t < p.T; ++t) out[n++] = static_cast<int32_t>(t);
      std::fill(out + n, out + width, -1);
      p.counts[b * p.Hkv + kh] = static_cast<int32_t>(n);
    }
}

inline void quest_select(const QuestParams& p) {
  if (p.bf16) quest_select_t<uint16_t>(p);
  else quest_select_t<float>(p);
}

}  // namespace cpu
}  // namespace accel
