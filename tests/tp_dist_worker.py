"""Worker for tests/test_tensor_parallel.py (run under torchrun, 2 ranks, gloo): a model loaded with transformers'
own tensor parallelism (tp_plan="auto") and patched by accel generates what the same checkpoint patched in one
process generates, for every per-head LM policy (padded batch, compressed caches, per-head plans whose heads sit on
both ranks); each rank's cache holds its heads' share of the bytes; the policies that combine heads are refused in
one line; remove() leaves the sharded model as it was. Argument: the checkpoint directory."""
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import accel
from accel.plan import HeadPlan, LayerPlan, Plan
from tests.conftest import left_padded

torch.set_num_threads(1)
path = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False).eval()
tp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False, tp_plan="auto").eval()
assert tp.tp_size == 2 and type(tp.model.layers[0].self_attn.k_proj.weight).__name__ == "DTensor"
Hkv, L = ref.config.num_key_value_heads, ref.config.num_hidden_layers
ids, mask = left_padded(B=2, L=200, pads=(0, 37), seed=1)

hylra_plan = Plan(policy="hylra", num_layers=L, num_kv_heads=Hkv,
                  layers=[LayerPlan(mode="full"), LayerPlan(mode="reuse", reuse_src=0), LayerPlan(mode="select"),
                          LayerPlan(mode="reuse", reuse_src=2)])
scores = [[0.9, 0.1, 0.6, 0.3], [0.5, 0.2, 0.8, 0.05], [0.05, 0.7, 0.4, 0.45], [0.3, 0.4, 0.15, 0.95]]
duo_plan = Plan(policy="duo", num_layers=L, num_kv_heads=Hkv, params={"sink": 4, "recent": 8},
                layers=[LayerPlan(mode="compress", kv="duo", heads=[HeadPlan(kind="streaming", score=s) for s in row])
                        for row in scores])
spans = [(96.0, 0.0), (0.0, 1.0), (128.0, 0.0), (160.0, 0.0)]
moa_plan = Plan(policy="moa", num_layers=L, num_kv_heads=Hkv,
                layers=[LayerPlan(mode="compress", kv="moa",
                                  heads=[HeadPlan(kind="budget", alpha=a, beta=b) for a, b in spans[i:] + spans[:i]])
                        for i in range(L)])
RUNS = [
    ("dense", {}),
    ("streaming", dict(sink=4, budget=48, budget_ratio=None)),
    ("snapkv", dict(budget=64, budget_ratio=None)),
    ("pyramidkv", dict(budget=64, budget_ratio=None)),
    ("h2o", dict(budget=64, budget_ratio=None)),
    ("duo", dict(plan=duo_plan, sink=4, recent=8, sparsity=0.5)),
    ("moa", dict(plan=moa_plan, sparse_prefill=False)),
    ("quest", dict(topk=32)),
    ("hip", dict(topk=32, sink=4, window=8, key_block=4, dense_layers=1)),
    ("hylra", dict(plan=hylra_plan, topk=32, min_topk=0, sink=4, recent=8, chunk=4)),
    ("hylra+streaming", {"plan": hylra_plan, "hylra.topk": 32, "hylra.min_topk": 0, "hylra.sink": 4, "hylra.recent": 8, "hylra.chunk": 4, "streaming.sink": 4, "streaming.budget": 96,
                         "streaming.budget_ratio": None}),
]


def run(model, policy, kw):
    with accel.patch(model, policy, **kw) as h, torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             output_scores=True, pad_token_id=0)
        return out, h.cache.nbytes(), h.runtime.fused, h.runtime.kv_offset, h.runtime.stats["kv_read_bytes"]


with torch.no_grad():
    before = tp(ids, attention_mask=mask).logits
impl = tp.config._attn_implementation
_, dense_bytes, _, _, dense_read = run(ref, "dense", {})
for policy, kw in RUNS:
    want, want_bytes, _, _, want_read = run(ref, policy, kw)
    got, got_bytes, fused, off, _ = run(tp, policy, kw)
    assert fused is None and off == rank * Hkv // 2, (policy, fused, off)
    assert torch.equal(got.sequences, want.sequences), (policy, got.sequences, want.sequences)
    err = max(float((a - b).abs().max()) for a, b in zip(got.scores, want.scores))
    assert err < 1e-4, (policy, err)
    total = torch.tensor([got_bytes])
    dist.all_reduce(total)  # the ranks' caches together hold what one process holds
    assert int(total) == want_bytes, (policy, int(total), want_bytes)
    if policy in ("quest", "hip", "hylra"):
        assert want_read < dense_read, policy  # sparse attention: reads fewer KV bytes per step
    elif policy != "dense":
        assert want_bytes < dense_bytes, policy  # a KV policy: holds fewer bytes
for policy, kw, why in [("delta", {}, "one page set per layer"), ("recycled", {}, "averaged over all"),
                        ("taskkv", {}, "layer's centre"), ("hylra", dict(plan=hylra_plan, agg="shared"), "agg='shared'")]:
    try:
        accel.patch(tp, policy, **kw)
    except accel.AccelError as e:
        msg = str(e)
        assert "\n" not in msg and "tensor parallelism" in msg and why in msg, msg
    else:
        raise AssertionError(f"{policy} was not refused under tensor parallelism")
    assert accel.get_handle(tp) is None and tp.config._attn_implementation == impl
with torch.no_grad():
    after = tp(ids, attention_mask=mask).logits
assert torch.equal(before, after) and tp.config._attn_implementation == impl
dist.barrier()
if rank == 0:
    print("TP_DIST_OK")
dist.destroy_process_group()
