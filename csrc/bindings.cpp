// The only pybind11 module of accel's CPU extension: declarations and m.def lines, nothing else.
#include <torch/extension.h>

std::vector<torch::Tensor> decode_attention_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                torch::Tensor lengths,
                                                c10::optional<torch::Tensor> indices,
                                                c10::optional<torch::Tensor> valid, double scale,
                                                bool return_lse, int64_t num_threads,
                                                c10::optional<torch::Tensor> scores,
                                                c10::optional<torch::Tensor> offsets,
                                                c10::optional<torch::Tensor> head_mask);
torch::Tensor small_m_linear_cpu(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias,
                                 int64_t num_threads, bool x_bf16);
std::vector<torch::Tensor> select_from_logits_cpu(torch::Tensor scores, torch::Tensor lse, int64_t T, int64_t num_kv_heads,
                                                  int64_t budget, int64_t agg, int64_t chunk, int64_t sink,
                                                  int64_t recent, c10::optional<torch::Tensor> first);
std::vector<torch::Tensor> select_topk_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor lengths, int64_t budget,
                                           int64_t agg, int64_t chunk, int64_t sink, int64_t recent, double scale);
torch::Tensor block_sparse_prefill_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor blocks,
                                       torch::Tensor counts, double scale);
std::string build_isa_cpu();
bool has_bf16_dot_cpu();
std::vector<torch::Tensor> quest_select_cpu(torch::Tensor q, torch::Tensor kmin, torch::Tensor kmax, int64_t n_pages,
                                            int64_t k_pages, int64_t page, int64_t T, int64_t agg,
                                            c10::optional<torch::Tensor> first, bool merged);
std::vector<torch::Tensor> hip_search_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor lo, torch::Tensor hi,
                                          int64_t key_block, int64_t rep, double scale, int64_t coarse_at,
                                          torch::Tensor first, torch::Tensor start, int64_t sink, int64_t window,
                                          bool aligned, int64_t rep_keys);
double scattered_read_probe_cpu(torch::Tensor buf, torch::Tensor rows, int64_t distance);
bool flush_cache_lines_cpu(torch::Tensor t);
int64_t ragged_evict_cpu(torch::Tensor k, torch::Tensor v, torch::Tensor pos, torch::Tensor score,
                         torch::Tensor offsets, torch::Tensor lengths, torch::Tensor budget, torch::Tensor sink_end,
                         torch::Tensor recent, bool by_age);
void ragged_accumulate_cpu(torch::Tensor logits, torch::Tensor lse, torch::Tensor offsets, torch::Tensor lengths,
                           torch::Tensor score);
std::vector<torch::Tensor> ragged_positions_to_slots_cpu(torch::Tensor pos, torch::Tensor offsets,
                                                         torch::Tensor lengths, torch::Tensor idx,
                                                         torch::Tensor counts, int64_t T);
bool ragged_append_cpu(torch::Tensor k, torch::Tensor v, torch::Tensor pos, torch::Tensor score, torch::Tensor offsets,
                       torch::Tensor lengths, torch::Tensor caps, torch::Tensor new_k, torch::Tensor new_v,
                       int64_t position);
std::vector<torch::Tensor> fused_attn_in_cpu(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wq,
                                             torch::Tensor wk, torch::Tensor wv, c10::optional<torch::Tensor> bq,
                                             c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
                                             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                                             double qk_eps, torch::Tensor cos, torch::Tensor sin, int64_t H,
                                             int64_t Hkv, bool bf16_inputs);
torch::Tensor fused_attn_out_mlp_cpu(torch::Tensor h, torch::Tensor a, torch::Tensor wo, c10::optional<torch::Tensor> bo,
                                     torch::Tensor ln, double eps, torch::Tensor wg, torch::Tensor wu, torch::Tensor wd,
                                     bool bf16_inputs);
std::vector<torch::Tensor> fused_decode_stack_cpu(
    torch::Tensor h, std::vector<std::vector<c10::optional<torch::Tensor>>> pre,
    std::vector<std::vector<c10::optional<torch::Tensor>>> post, std::vector<double> eps,
    std::vector<c10::optional<torch::Tensor>> k_bufs, std::vector<c10::optional<torch::Tensor>> v_bufs, int64_t start,
    int64_t pos, c10::optional<torch::Tensor> valid, torch::Tensor cos, torch::Tensor sin, int64_t H, int64_t Hkv,
    double scale, std::vector<std::vector<torch::Tensor>> ragged, std::vector<int64_t> ragged_flags,
    std::vector<int64_t> positions, bool bf16_inputs, std::vector<std::vector<torch::Tensor>> quest,
    std::vector<int64_t> quest_args, c10::optional<torch::Tensor> first);
std::vector<torch::Tensor> latent_decode_cpu(torch::Tensor q, torch::Tensor kv, torch::Tensor lengths, int64_t dl,
                                             c10::optional<torch::Tensor> indices, c10::optional<torch::Tensor> valid,
                                             double scale, int64_t num_threads);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "accel CPU kernels (C++/OpenMP)";
  m.def("decode_attention", &decode_attention_cpu, "GQA decode attention over a strided KV cache",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("lengths"),
        pybind11::arg("indices") = pybind11::none(), pybind11::arg("valid") = pybind11::none(),
        pybind11::arg("scale"), pybind11::arg("return_lse") = false, pybind11::arg("num_threads") = 0,
        pybind11::arg("scores") = pybind11::none(), pybind11::arg("offsets") = pybind11::none(),
        pybind11::arg("head_mask") = pybind11::none());
  m.def("small_m_linear", &small_m_linear_cpu, "decode linear y = x W^T + b for 1..64 rows",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("num_threads") = 0, pybind11::arg("x_bf16") = false);
  m.def("select_topk", &select_topk_cpu, "group-aggregated top-k token selection with forced sink/recent");
  m.def("select_from_logits", &select_from_logits_cpu,
        "top-k token positions from decode logits and lse (layer-reuse anchors), same rules as select_topk");
  m.def("block_sparse_prefill", &block_sparse_prefill_cpu, "block-sparse causal prefill attention (64-token blocks)");
  m.def("flush_cache_lines", &flush_cache_lines_cpu, py::arg("t"),
        "flush the tensor's storage from every cache level (x86 clflush); False where unsupported");
  m.def("ragged_evict", &ragged_evict_cpu,
        "evict every head of a compressed KV layer down to its budget (lowest score or oldest, sinks and recent "
        "tokens protected); swap-remove in place");
  m.def("ragged_positions_to_slots", &ragged_positions_to_slots_cpu,
        "selected positions -> each head's rows that hold them (layer reuse over a compressed cache)");
  m.def("ragged_append", &ragged_append_cpu,
        "append one token per head of a compressed KV layer; false (nothing written) if a head is full");
  m.def("ragged_accumulate", &ragged_accumulate_cpu,
        "add each kept token's decode attention (mean over the GQA group) to its eviction score");
  m.def("latent_decode", &latent_decode_cpu,
        "MLA / TPLA-shard decode over latent rows [c | k_rope]: MQA with a (Dl+Dr)-wide key and the Dl-wide latent "
        "as value; optional index lists (sparse) and validity mask; returns (out [B, H, Dl], lse [B, H])",
        pybind11::arg("q"), pybind11::arg("kv"), pybind11::arg("lengths"), pybind11::arg("dl"),
        pybind11::arg("indices") = pybind11::none(), pybind11::arg("valid") = pybind11::none(),
        pybind11::arg("scale"), pybind11::arg("num_threads") = 0);
  m.def("fused_attn_in", &fused_attn_in_cpu,
        "decode layer, attention input: RMSNorm, q/k/v projections, optional per-head q/k RMSNorm, rotary embedding",
        pybind11::arg("h"), pybind11::arg("ln"), pybind11::arg("eps"), pybind11::arg("wq"), pybind11::arg("wk"),
        pybind11::arg("wv"), pybind11::arg("bq") = pybind11::none(), pybind11::arg("bk") = pybind11::none(),
        pybind11::arg("bv") = pybind11::none(), pybind11::arg("q_norm") = pybind11::none(),
        pybind11::arg("k_norm") = pybind11::none(), pybind11::arg("qk_eps") = 1e-6, pybind11::arg("cos"),
        pybind11::arg("sin"), pybind11::arg("H"), pybind11::arg("Hkv"),
        pybind11::arg("bf16_inputs") = false);
  m.def("fused_attn_out_mlp", &fused_attn_out_mlp_cpu,
        "decode layer, after attention: o projection + residual, RMSNorm, SiLU-gated MLP + residual (new tensor)",
        pybind11::arg("h"), pybind11::arg("a"), pybind11::arg("wo"), pybind11::arg("bo") = pybind11::none(),
        pybind11::arg("ln"), pybind11::arg("eps"), pybind11::arg("wg"), pybind11::arg("wu"), pybind11::arg("wd"),
        pybind11::arg("bf16_inputs") = false);
  m.def("fused_decode_stack", &fused_decode_stack_cpu,
        "a decode step through every layer: per layer the fused halves, the new k/v written into the layer's cache "
        "(dense buffers at position `pos`, or a compressed layer's per-head pools), decode attention over what it "
        "holds (a Quest layer: over its selected pages, its summaries float32 or bfloat16, per-query-head pages read as "
        "their union), and a compressed layer's accumulation and eviction; returns (the last layer's output, KV rows read), "
        "or nothing when a compressed layer must grow first",
        pybind11::arg("h"), pybind11::arg("pre"), pybind11::arg("post"), pybind11::arg("eps"), pybind11::arg("k_bufs"),
        pybind11::arg("v_bufs"), pybind11::arg("start"), pybind11::arg("pos"), pybind11::arg("valid") = pybind11::none(),
        pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("H"), pybind11::arg("Hkv"), pybind11::arg("scale"),
        pybind11::arg("ragged") = std::vector<std::vector<torch::Tensor>>(),
        pybind11::arg("ragged_flags") = std::vector<int64_t>(), pybind11::arg("positions") = std::vector<int64_t>(),
        pybind11::arg("bf16_inputs") = false, pybind11::arg("quest") = std::vector<std::vector<torch::Tensor>>(),
        pybind11::arg("quest_args") = std::vector<int64_t>(), pybind11::arg("first") = pybind11::none());
  m.def("quest_select", &quest_select_cpu,
        "Quest's page selection: page upper bounds from the key min/max summaries (float32 or bfloat16), aggregated over "
        "each GQA group or kept per query head (agg 3, one pass over the summaries for the whole group), top k_pages (the "
        "current page always) expanded to token positions; agg 3 with merged: the group's union with a head_mask "
        "(bit g: query head g of the group selected the position)",
        pybind11::arg("q"), pybind11::arg("kmin"), pybind11::arg("kmax"), pybind11::arg("n_pages"),
        pybind11::arg("k_pages"), pybind11::arg("page"), pybind11::arg("T"), pybind11::arg("agg"),
        pybind11::arg("first") = pybind11::none(), pybind11::arg("merged") = false);
  m.def("hip_search", &hip_search_cpu,
        "HiP's hierarchical branch search: split every branch in two, keep the n best children by their representative "
        "keys' largest logit (rep_keys keys per child), down to key_block; returns (lo, hi, coarse_lo, coarse_hi, "
        "positions, counts, reads)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("lo"), pybind11::arg("hi"), pybind11::arg("key_block"),
        pybind11::arg("rep"), pybind11::arg("scale"), pybind11::arg("coarse_at"), pybind11::arg("first"),
        pybind11::arg("start"), pybind11::arg("sink"), pybind11::arg("window"), pybind11::arg("aligned") = false,
        pybind11::arg("rep_keys") = 1);
  m.def("has_bf16_dot", &has_bf16_dot_cpu,
        "whether bf16 weights times bf16 inputs run on vdpbf16ps (AVX512_BF16) in this build");
  m.def("build_isa", &build_isa_cpu,
        "the vector instructions the kernels were compiled for: 'AVX512' (16-lane vectors), 'AVX2' or 'baseline'");
  m.def("scattered_read_probe", &scattered_read_probe_cpu,
        "sum of the given rows of a [R, W] float32 buffer with a software prefetch `distance` rows ahead "
        "(a benchmark probe of the scattered-row read bandwidth)");
}
