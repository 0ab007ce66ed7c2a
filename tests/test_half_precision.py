"""fp16 and bf16 models on the CPU: accel's kernels read 16-bit weights and caches and compute in fp32. Every policy
equals accel dense in the same dtype when its budget covers the context (a left-padded batch), and accel dense
stays within 16-bit rounding of unpatched transformers in that dtype."""
import pytest
import torch

from .conftest import gen, hand_plan, left_padded, model4

LAYER = [("hylra", {"plan": "hand", "topk": 4096}), ("delta", {"full_layers": [0], "delta_layers": [1], "topk": 4096}),
         ("quest", {"topk": 4096}), ("hip", {"topk": 4096}), ("recycled", {"topk": 4096})]
KV = [(p, {"budget_ratio": 1.0}) for p in ("streaming", "snapkv", "pyramidkv", "h2o", "taskkv")]


def _rel(a, b):
    """Largest logit difference over the run, relative to the largest logit."""
    scale = max(x.abs().max().item() for x in b.scores)
    return max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) / scale


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy,kw", LAYER + KV)
def test_a_covering_budget_equals_dense_in_half_precision(policy, kw, dtype):
    m = model4("llama").to(dtype)
    ids, mask = left_padded(2, 40, (0, 7), 1, high=250)
    ref = gen(m, ids, "dense", mask=mask)
    kw = dict(kw)
    if kw.get("plan") == "hand":
        kw["plan"] = hand_plan()
    out = gen(m, ids, policy, mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    # attention summed in another order, then rounded to 16 bits: within a few units of the dtype's rounding
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_equals_unpatched_transformers_in_half_precision(dtype):
    m = model4("llama").to(dtype)
    ids, mask = left_padded(2, 40, (0, 7), 2, high=250)
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, pad_token_id=0)
    out = gen(m, ids, "dense", mask=mask)
    assert torch.equal(out.sequences, ref.sequences)
    assert _rel(out, ref) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
