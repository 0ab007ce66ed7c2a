"""torch.compile readiness: accel's C++ decode kernels are torch.library custom ops with fake implementations
(checked by torch.library.opcheck), and a compiled forward of a patched model generates the same tokens as eager
without recompiling at every step."""
import pytest
import torch

import accel
from accel import _ext

from .conftest import model4

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason="needs the C++ extension (accel._C)")


def test_custom_ops_pass_opcheck():
    from accel.ops.library import ensure_ops

    assert ensure_ops()
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    torch.library.opcheck(torch.ops.accel.small_m_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.accel.small_m_linear.default, (x, w, None))
    assert torch.allclose(torch.ops.accel.small_m_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)
    q = torch.randn(2, 4, 16, generator=g)
    k, v = torch.randn(2, 2, 30, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    lengths = torch.tensor([[30, 30], [21, 21]], dtype=torch.int32)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :5] = False
    torch.library.opcheck(torch.ops.accel.decode_attention.default, (q, k, v, lengths, valid, 0.25))
    torch.library.opcheck(torch.ops.accel.decode_attention.default, (q, k, v, lengths, None, 0.25))
    from accel.ops._reference import decode_attention_ref

    ref = decode_attention_ref(q, k, v, lengths, valid=valid, scale=0.25)
    assert torch.allclose(torch.ops.accel.decode_attention(q, k, v, lengths, valid, 0.25), ref, atol=1e-5)


def test_ops_trace_into_one_graph_without_breaks():
    from accel.ops.attention import decode_attention
    from accel.ops.library import ensure_ops

    ensure_ops()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g)
    w = torch.randn(8, 16, generator=g)

    def f(q, k, v, w):
        o = decode_attention(q, k, v, scale=0.25, backend="cpp")
        return torch.ops.accel.small_m_linear(o.reshape(4, 16), w, None)

    explained = torch._dynamo.explain(f)(q, k, v, w)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert torch.allclose(torch.compile(f, backend="eager")(q, k, v, w), f(q, k, v, w))


@pytest.mark.parametrize("policy", ["dense", "snapkv"])
def test_compiled_forward_of_a_patched_model_equals_eager(policy):
    from torch._dynamo.utils import counters

    m = model4("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = m.generate(ids, **kw)
    torch._dynamo.reset()
    counters.clear()
    with accel.patch(m, policy, **({"budget_ratio": 1.0} if policy == "snapkv" else {})) as h:
        eager = m.generate(ids, **kw)
        m.forward = torch.compile(m.forward, backend="eager")
        try:
            out = m.generate(ids, **kw)
            out2 = m.generate(ids, **kw)
        finally:
            del m.forward
        assert h.cache.nbytes() > 0  # the compiled forward ran on accel's cache
    assert torch.equal(eager, ref) and torch.equal(out, ref) and torch.equal(out2, ref)
    # a few graphs (prefill, first decode, then one with the position made dynamic), not one per step
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
