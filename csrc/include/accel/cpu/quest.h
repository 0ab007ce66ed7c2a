// Quest's page selection for one decode step, CPU (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient
// Long-Context LLM Inference", arXiv 2406.10774). Torch-free.
//
// Per (sequence, KV head): the upper bound U_j = sum_d max(q_d M_jd, q_d m_jd) of every page j from its key min m_j
// and max M_j (accel.cache.quest.QuestMetadata keeps them), for each query head of the GQA group, aggregated over the
// group (max / mean / sum), or kept per query head (none: each query head selects its own pages, all G heads' bounds
// from one pass over the summaries); pages holding only left padding rank last (-inf), the current (last) page first
// (+inf); the k_pages highest (ties: the lower page) are expanded to their token positions below T, ascending. One call
// replaces the ~20 small torch operations per layer of the same selection (accel.policies.quest's torch path).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
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
  int agg = 0;  // 0 max, 1 mean, 2 sum, 3 none (one selection per query head)
  const int64_t* first = nullptr;  // [B] first real (non-padding) position, or nullptr
  int32_t* out = nullptr;     // [B, Hkv, k_pages * page], -1 padded; agg none: [G, B, Hkv, k_pages * page]
  int32_t* counts = nullptr;  // [B, Hkv]; agg none: [G, B, Hkv] (query head kh * G + g at [g, b, kh])
  // agg none, optional: the G selections' union instead, out [B, Hkv, G * k_pages * page] ascending, -1 padded,
  // counts [B, Hkv], head_mask [B, Hkv, G * k_pages * page] bit g where query head kh * G + g selected the position
  // (what accel.ops._selection_reference.merge_head_selections_ref makes of the G selections, here from the pages)
  uint64_t* head_mask = nullptr;
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

// One page's bound lanes for each of the GC query heads of a group (D a multiple of 16; M the page's key max, m its
// min, qp / qn the query's positive / negative parts): out[g]'s lanes sum to head g's bound. Each 16-lane chunk of
// the page's min and max is loaded once for the whole group and every head keeps two independent accumulators, so the
// loop runs at the summaries' read rate instead of one long chain of dependent multiply-adds per head.
template <typename S, int GC>
static inline void page_bound_lanes(const float* qp, const float* qn, const S* M, const S* m, int D, v16f* out) {
  v16f up[GC], un[GC];
  for (int g = 0; g < GC; ++g) up[g] = v16f{}, un[g] = v16f{};
  for (int d = 0; d < D; d += 16) {
    const v16f vM = load16(M + d), vm = load16(m + d);
    for (int g = 0; g < GC; ++g) {
      up[g] += load16(qp + g * D + d) * vM;
      un[g] += load16(qn + g * D + d) * vm;
    }
  }
  for (int g = 0; g < GC; ++g) out[g] = up[g] + un[g];
}

// Quest's bound of every page of one (sequence, KV head), aggregated over the GQA group, into score[0, n_pages), or
// (agg_code 3) each query head g's own bound into score[g * n_pages, (g + 1) * n_pages): NaN bounds rank first
// (+inf). GC > 0: the group size known at compile time and D a multiple of 16 (page_bound_lanes).
// DC > 0: the head dim known at compile time (64 and 128; the page loops then run unrolled). With the head dim a
// runtime value the head-by-head traversal below gained nothing: the whole selection of 30 layers x 3 KV heads x
// 2000 fp32 pages, G = 3, one selection per query head, took 10.2-10.4 ms either way, and 8.2-8.5 ms with both
// (7.9-8.1 with the branch-free page marking below; scratch harness, one thread, AMD EPYC, 2026-12-07).
// (Kept out of line: inlined into quest_select_t's loop, the selection measured ~2 ms a step slower in the harness
// of kth_largest below.)
template <typename S, int GC, int DC = 0>
__attribute__((noinline)) static void quest_bounds(const float* qp, const float* qn, const S* mn, const S* mx,
                                                   int64_t sp, int64_t n_pages, int D_, int G, int agg_code,
                                                   float* score) {
  const int D = DC > 0 ? DC : D_;
  const float ninf = -std::numeric_limits<float>::infinity(), pinf = std::numeric_limits<float>::infinity();
  int64_t j0 = 0;
#ifdef ACCEL_V16F_NATIVE
  if constexpr (GC > 0) {
    // 16 pages at a time: each page's per-head lane vectors go to a small buffer, then one tree sums all 16 of a head
    v16f part[GC][16];
    const v16f vninf = v16f{} + ninf, vpinf = v16f{} + pinf;
    // the last block is padded with zero vectors, so every page's bound comes out of the same tree (equal pages tie
    // exactly, as they do in the torch path)
    for (; j0 < n_pages; j0 += 16) {
      const int cnt = static_cast<int>(std::min<int64_t>(16, n_pages - j0));
      for (int i = cnt; i < 16; ++i)
        for (int g = 0; g < GC; ++g) part[g][i] = v16f{};
      // One head at a time over the block: the first pass reads the block's summaries from memory, the later ones
      // from L1, and the second requests the next block's, so its reads overlap this block's remaining passes. (All
      // G heads per page in one pass computed at ~60 GB/s with the summaries in cache but read them from DRAM at 16-19
      // GB/s where a plain read of the same two streams ran at 29-46; software requests a fixed distance ahead, one
      // interleaved min/max buffer and separate max and min passes did not change that. Head by head with the next
      // block requested: 3.4-3.9 ms against 5.4-5.6 for 30 layers x 3 KV heads x 2000 pages of fp32 summaries, G = 3,
      // one thread, AMD EPYC, scratch harness, 2026-12-07.) Each head's two accumulators are those of
      // page_bound_lanes (one head), so the bounds are bit-identical.
      const int pf_head = GC > 1 ? 1 : 0;
      for (int g = 0; g < GC; ++g)
        for (int i = 0; i < cnt; ++i) {
          if (g == pf_head && j0 + 16 + i < n_pages) {
            const char* a = reinterpret_cast<const char*>(mx + (j0 + 16 + i) * sp);
            const char* b = reinterpret_cast<const char*>(mn + (j0 + 16 + i) * sp);
            for (int c = 0; c < D * static_cast<int>(sizeof(S)); c += 64) __builtin_prefetch(a + c, 0, 3), __builtin_prefetch(b + c, 0, 3);
          }
          page_bound_lanes<S, 1>(qp + g * D, qn + g * D, mx + (j0 + i) * sp, mn + (j0 + i) * sp, D, &part[g][i]);
        }
      if (agg_code == 3) {  // every head's own bounds
        for (int g = 0; g < GC; ++g) {
          const v16f u = reduce16x16(part[g]);
          const v16f r = (u != u) ? vpinf : u;
          std::memcpy(score + g * n_pages + j0, &r, sizeof(float) * cnt);
        }
        continue;
      }
      v16f agg = agg_code == 0 ? vninf : v16f{};
      v16i nan{};
      for (int g = 0; g < GC; ++g) {
        const v16f u = reduce16x16(part[g]);
        nan |= u != u;  // NaN keys: the bound is NaN (torch's amax would propagate it)
        agg = agg_code == 0 ? (u > agg ? u : agg) : agg + u;
      }
      nan |= agg != agg;  // NaN keys, or +inf and -inf bounds summed
      if (agg_code == 1) agg /= static_cast<float>(G);
      const v16f r = nan ? vpinf : agg;  // a NaN bound ranks first (as torch's topk)
      std::memcpy(score + j0, &r, sizeof(float) * cnt);
    }
  }
#endif
  for (int64_t j = j0; j < n_pages; ++j) {
    const S* M = mx + j * sp;
    const S* m = mn + j * sp;
    float agg = agg_code == 0 ? ninf : 0.f;
    bool nan = false;
    if constexpr (GC > 0) {
      v16f lanes[GC];
      page_bound_lanes<S, GC>(qp, qn, M, m, D, lanes);
      for (int g = 0; g < GC; ++g) {
        const float u = hsum16(lanes[g]);
        if (agg_code == 3) score[g * n_pages + j] = u != u ? pinf : u;
        nan |= u != u;
        agg = agg_code == 0 ? (u > agg ? u : agg) : agg + u;
      }
    } else {
      for (int g = 0; g < G; ++g) {
        const float* a = qp + g * D;
        const float* c = qn + g * D;
        float u = 0.f;
        int d = 0;
        if (D >= 16) {
          v16f s{};
          for (; d + 16 <= D; d += 16) s += load16(a + d) * load16(M + d) + load16(c + d) * load16(m + d);
          u = hsum16(s);
        }
        for (; d < D; ++d) u += a[d] * SummaryStore<S>::get(M + d) + c[d] * SummaryStore<S>::get(m + d);
        if (agg_code == 3) score[g * n_pages + j] = u != u ? pinf : u;
        nan |= u != u;  // NaN keys: the bound is NaN (torch's amax would propagate it)
        agg = agg_code == 0 ? (u > agg ? u : agg) : agg + u;
      }
    }
    if (agg_code == 3) continue;
    nan = nan || agg != agg;  // NaN keys, or +inf and -inf bounds summed
    // a NaN bound ranks first (torch's topk puts NaN first; among NaN and +inf bounds either order is a tie)
    score[j] = nan ? pinf : agg_code == 1 ? agg / static_cast<float>(G) : agg;
  }
}

// The want-th largest of sc[0, n) (1 <= want <= n; no NaN): the values as order-preserving unsigned keys, then the
// largest key t with at least `want` keys >= t, by bisection between the least and the greatest key (at most 32
// branch-free counting passes over the keys). It replaced a threshold bracketed from a sample of every 8th value and
// selected with std::nth_element (the same value): the whole selection of 30 layers x 3 KV heads x 2000 pages, G = 3,
// one selection per query head, 8.0-8.4 ms a step before (bracket, quest_bounds inlined into the selection loop) and
// 6.1-6.5 ms after (bisection, quest_bounds out of line); with quest_bounds out of line in both, 7.6-8.1 -> 5.6-6.0 ms,
// and inlined in both the bisection measured no change (scratch harness, one thread, AMD EPYC, 2026-12-07).
static inline float kth_largest(const float* sc, int64_t n, int64_t want, std::vector<uint32_t>& key) {
  key.resize(static_cast<size_t>(n));
  uint32_t* kp = key.data();
  uint32_t lo = 0xFFFFFFFFu, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, sc + i, sizeof(b));
    const uint32_t k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // -inf < ... < -0 < +0 < ... < +inf
    kp[i] = k;
    lo = k < lo ? k : lo;
    hi = k > hi ? k : hi;
  }
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; ++i) c += kp[i] >= mid;
    if (c >= want) lo = mid;
    else hi = mid - 1;
  }
  const uint32_t b = (lo & 0x80000000u) ? (lo & 0x7FFFFFFFu) : ~lo;
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

template <typename S>
void quest_select_t(const QuestParams& p) {
  const int G = p.H / p.Hkv;
  const bool per_head = p.agg == 3;
  const int rows = per_head ? G : 1;  // selections per (sequence, KV head)
  const int64_t width = p.k_pages * p.page;
  const float ninf = -std::numeric_limits<float>::infinity();
  const bool vec = p.D % 16 == 0;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.B; ++b)
    for (int kh = 0; kh < p.Hkv; ++kh) {
      std::vector<float> qp(static_cast<size_t>(G) * p.D), qn(qp.size()), score(static_cast<size_t>(rows) * p.n_pages);
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < p.D; ++d) {
          const float x = p.q[(static_cast<int64_t>(b) * p.H + kh * G + g) * p.D + d];
          qp[g * p.D + d] = x > 0.f ? x : 0.f;
          qn[g * p.D + d] = x < 0.f ? x : 0.f;
        }
      const S* mn = static_cast<const S*>(p.kmin) + b * p.sb + kh * p.sh;
      const S* mx = static_cast<const S*>(p.kmax) + b * p.sb + kh * p.sh;
      const float* a = qp.data();
      const float* c = qn.data();
      float* sc = score.data();
      switch (vec ? G : 0) {
#define ACCEL_QUEST_G(GG)                                                                                  \
  case GG:                                                                                                 \
    if (p.D == 64) quest_bounds<S, GG, 64>(a, c, mn, mx, p.sp, p.n_pages, p.D, G, p.agg, sc);              \
    else if (p.D == 128) quest_bounds<S, GG, 128>(a, c, mn, mx, p.sp, p.n_pages, p.D, G, p.agg, sc);       \
    else quest_bounds<S, GG>(a, c, mn, mx, p.sp, p.n_pages, p.D, G, p.agg, sc);                            \
    break;
        ACCEL_QUEST_G(1)
        ACCEL_QUEST_G(2)
        ACCEL_QUEST_G(3)
        ACCEL_QUEST_G(4)
        ACCEL_QUEST_G(5)
        ACCEL_QUEST_G(6)
        ACCEL_QUEST_G(7)
        ACCEL_QUEST_G(8)
#undef ACCEL_QUEST_G
        default: quest_bounds<S, 0>(a, c, mn, mx, p.sp, p.n_pages, p.D, G, p.agg, sc);
      }
      std::vector<uint32_t> tmp;
      const bool merged = per_head && p.head_mask != nullptr;
      std::vector<uint64_t> held(merged ? static_cast<size_t>(p.n_pages) : 0);  // per page: the heads that chose it
      for (int r = 0; r < rows; ++r) {
        float* srow = sc + static_cast<int64_t>(r) * p.n_pages;
        if (p.first)
          for (int64_t j = 0; j < p.n_pages && (j + 1) * p.page <= p.first[b]; ++j) srow[j] = ninf;
        // the current (last) page always, then the k - 1 first of the others in (score descending, page ascending):
        // the (k-1)-th largest score of the others is the threshold; every page above it is kept and, of the pages
        // at it, the lowest ones up to k - 1 in all (the same set as a full sort; scores hold no NaN here)
        const int64_t k = std::max<int64_t>(1, std::min(p.k_pages, p.n_pages)), others = p.n_pages - 1;
        const int64_t slot = (static_cast<int64_t>(r) * p.B + b) * p.Hkv + kh;
        int32_t* out = p.out + slot * width;
        int64_t n = 0;
        auto emit = [&](int64_t j) {
          if (merged) {
            held[j] |= uint64_t{1} << r;
            return;
          }
          for (int64_t t = j * p.page; t < (j + 1) * p.page && t < p.T; ++t) out[n++] = static_cast<int32_t>(t);
        };
        const int64_t want = k - 1;
        if (want >= others) {
          for (int64_t j = 0; j < others; ++j) emit(j);
        } else if (want > 0) {
          const float thr = kth_largest(srow, others, want, tmp);
          if (merged) {  // the pages above the threshold marked without branches, then the lowest ties (if any)
            const uint64_t bit = uint64_t{1} << r;
            uint64_t* hp = held.data();
            int64_t above = 0;
#pragma omp simd reduction(+ : above)
            for (int64_t j = 0; j < others; ++j) {
              const bool up = srow[j] > thr;
              hp[j] |= up ? bit : uint64_t{0};
              above += up;
            }
            int64_t ties = want - above;
            for (int64_t j = 0; j < others && ties > 0; ++j)
              if (srow[j] == thr) hp[j] |= bit, --ties;
          } else {
            int64_t above = 0;
            for (int64_t j = 0; j < others; ++j) above += srow[j] > thr;
            int64_t ties = want - above;  // pages at the threshold still to take, lowest first
            for (int64_t j = 0; j < others; ++j)
              if (srow[j] > thr || (srow[j] == thr && ties-- > 0)) emit(j);
          }
        }
        emit(p.n_pages - 1);
        if (merged) continue;
        std::fill(out + n, out + width, -1);
        p.counts[slot] = static_cast<int32_t>(n);
      }
      if (merged) {  // the union, ascending, each position with the heads that chose its page
        const int64_t bh = static_cast<int64_t>(b) * p.Hkv + kh, uw = static_cast<int64_t>(G) * width;
        int32_t* out = p.out + bh * uw;
        uint64_t* mk = p.head_mask + bh * uw;
        int64_t n = 0;
        for (int64_t j = 0; j < p.n_pages; ++j)
          if (held[j])
            for (int64_t t = j * p.page; t < (j + 1) * p.page && t < p.T; ++t) out[n] = static_cast<int32_t>(t), mk[n++] = held[j];
        std::fill(out + n, out + uw, -1);
        std::fill(mk + n, mk + uw, uint64_t{0});
        p.counts[bh] = static_cast<int32_t>(n);
      }
    }
}

inline void quest_select(const QuestParams& p) {
  if (p.bf16) quest_select_t<uint16_t>(p);
  else quest_select_t<float>(p);
}

}  // namespace cpu
}  // namespace accel
