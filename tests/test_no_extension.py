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
    exec(QUEST)
    print("NOEXT_OK")
    """
)

# Quest with every query head's own pages on a fresh model of the script's seed: the selection, the union of a group's
# pages and the head-masked attention (in torch without the extension, in C++ with it); its tokens are printed
QUEST = textwrap.dedent(
    """
    import torch, accel
    from transformers import LlamaConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(1))
    with accel.patch(m, "quest", agg="none", topk=8, page_size=4, min_topk=0, dense_layers=0):
        q = m.generate(ids, max_new_tokens=8, do_sample=False)
    print("QUEST", q[:, 60:].tolist())
    """
)


def test_pure_torch_fallback():
    r = subprocess.run([sys.executable, "-c", f"QUEST = {QUEST!r}\n" + SCRIPT], capture_output=True, text=True,
                       timeout=300)
    assert "NOEXT_OK" in r.stdout, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("QUEST"))
    cpp = subprocess.run([sys.executable, "-c", QUEST], capture_output=True, text=True, timeout=300)
    assert line in cpp.stdout.splitlines(), cpp.stdout + cpp.stderr  # the C++ path generates the same tokens
