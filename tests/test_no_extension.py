"""Without the compiled extension accel still imports and works, on its pure-torch reference path."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["accel._C"] = None          # simulate a machine where the C++ build was skipped
    import torch, accel
    from accel import _ext
    from accel.ops.attention import choose_backend
    assert not _ext.HAS_CPU_EXT and "did not import" in _ext.CPU_EXT_REASON
    assert choose_backend(torch.device("cpu")) == "torch"
    from transformers import LlamaConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 128, (2, 16))
    ref = m.generate(ids, max_new_tokens=8, do_sample=False)
    with accel.patch(m, "dense") as h:
        out = m.generate(ids, max_new_tokens=8, do_sample=False)
        assert not h._fast_linears          # nothing bound without the extension
    assert torch.equal(ref, out)
    print("NOEXT_OK")
    """
)


def test_pure_torch_fallback():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert "NOEXT_OK" in r.stdout, r.stdout + r.stderr
