"""accel on models loaded with transformers' own tensor parallelism (``tp_plan="auto"``): two gloo ranks under
torchrun (tests/tp_dist_worker.py) against one process, and the refusals a single process can check."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import accel

from .conftest import tiny_mla, tiny_model


def _checkpoint(path):
    """A 4-layer Llama with 8 query / 4 KV heads (two KV heads and their query heads per rank); q/k scaled up so
    attention is peaked like a trained model's and token selections have no near-ties that float rounding (the
    ranks sum the o and down projections in another order) could flip."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    m = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    m.save_pretrained(path)


@pytest.mark.exactness
def test_tensor_parallel_ranks_generate_what_one_process_generates(tmp_path):
    """Every per-head LM policy on 2 ranks: same tokens and logits (1e-4) as one process, the ranks' caches hold
    together exactly the one-process cache's bytes, per-head plans (duo, moa) read their rank's heads, head-combining
    policies are refused in one line, remove() restores the sharded model."""
    _checkpoint(tmp_path / "ckpt")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(root / "tests" / "tp_dist_worker.py"), str(tmp_path / "ckpt")], capture_output=True,
                       text=True, env=env, timeout=600, cwd=root)
    assert "TP_DIST_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_a_tensor_parallel_model_without_a_process_group_is_refused():
    """The sharding needs torchrun; a model that says it is sharded outside a process group is refused before
    anything is touched (transformers' tp_size attribute is what patch reads)."""
    model = tiny_model("llama")
    model._tp_size = 2
    with pytest.raises(accel.AccelError, match=r"tp_size=2 but torch.distributed is not initialized; start the script "
                                               r"with torchrun"):
        accel.patch(model, "dense")
    assert model.config._attn_implementation == "sdpa" and accel.get_handle(model) is None


def test_tensor_parallelism_under_other_patchers_is_refused():
    model = tiny_mla()
    model._tp_size = 2
    with pytest.raises(accel.AccelError, match=r"tensor parallelism \(tp_size=2\) and policy 'tpla' is served by "
                                               r"accel's MLA patcher.*use tpla's own tensor parallelism"):
        accel.patch(model, "tpla")
    assert accel.get_handle(model) is None


def test_every_lm_policy_says_whether_it_runs_on_a_slice_of_the_heads():
    """Per-head policies run on a rank's heads; the head-combining ones name what they combine."""
    from accel.plan import LayerPlan, Plan
    from accel.policies.base import ComposedPolicy
    from accel.policies.registry import make_policy

    def problem(name, kw=None, plan=None):  # a KV policy comes composed with dense: every part answers
        p = make_policy(name, kw or {})
        parts = [p.attention, *p.kv] if isinstance(p, ComposedPolicy) else [p]
        return "; ".join(r for q in parts if (r := q.tensor_parallel_problem(plan))) or None

    for name in ["dense", "streaming", "snapkv", "pyramidkv", "h2o", "duo", "moa", "quest", "hip", "hylra", "hylra+snapkv"]:
        assert problem(name) is None, name
    for name, why in [("delta", "one page set per layer"), ("recycled", "averaged over all"),
                      ("taskkv", "layer's centre"), ("hylra+taskkv", "layer's centre")]:
        assert why in problem(name), name
    assert "agg='shared'" in problem("hylra", {"agg": "shared"})
    shared = Plan(policy="hylra", num_layers=2, layers=[LayerPlan(mode="full"), LayerPlan(mode="full", params={"agg": "shared"})])
    assert "agg='shared'" in problem("hylra", plan=shared)


def test_a_mesh_with_pipeline_or_fsdp_dimensions_is_refused():
    """transformers sets a device mesh for any distributed config; accel follows its tensor-parallel dimension only:
    a pipeline stage holds some of the layers, FSDP shards every weight."""

    class Mesh:
        mesh_dim_names = ("pp", "fsdp", "tp")
        sizes = {"pp": 2, "fsdp": 1, "tp": 1}

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda s, n=self.sizes[name]: n})()

        def size(self):
            return 2

    model = tiny_model("llama")
    model._device_mesh = Mesh()
    with pytest.raises(accel.AccelError, match=r"device mesh with pp=2: accel follows tensor parallelism \(tp\) only"):
        accel.patch(model, "dense")
    assert model.config._attn_implementation == "sdpa" and accel.get_handle(model) is None


def test_calibrating_a_tensor_parallel_model_is_refused_with_the_way_to_do_it():
    model = tiny_model("llama")
    model._tp_size = 2
    with pytest.raises(accel.AccelError, match="calibrate the checkpoint loaded without tp_plan, save the plan"):
        accel.calibrate(model, None, ["text"], policy="hylra")


@pytest.mark.exactness
def test_accel_generate_tp_runs_a_policy_on_transformers_tensor_parallel_ranks(tmp_path):
    """`accel generate --tp 2` under torchrun (2 gloo ranks) loads the model with transformers' tensor parallelism and
    runs the policy on each rank's heads: rank 0 prints what one process prints (snapkv compressing the prompt's
    cache); a policy that combines heads is refused in one line (exit 2)."""
    import transformers as T

    from accel.cli.main import main
    from accel.models.loader import converted_path, load

    load("smollm2-135m")  # the converted folder (and its tokenizer) exists
    tok = T.AutoTokenizer.from_pretrained(str(converted_path("smollm2-135m")))
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked attention and logits: no near-ties for the ranks' summation order to flip
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
        m.lm_head.weight.mul_(8)
    ck = tmp_path / "ckpt"
    m.save_pretrained(ck)
    tok.save_pretrained(ck)
    prompt = "The essay begins with a list of the things a startup needs: " * 4
    args = ["generate", "--model", str(ck), "--policy", "snapkv", "--set", "budget_ratio=0.25", "--prompt", prompt,
            "--max-new-tokens", "6"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    want = buf.getvalue()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "accel"]
    r = subprocess.run(run + args + ["--tp", "2"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout == want and want.strip()
    assert "[snapkv] on 2 tensor-parallel ranks (transformers' tp_plan) prompt" in r.stderr
    r = subprocess.run(run + ["generate", "--model", str(ck), "--policy", "delta", "--prompt", prompt, "--tp", "2"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode != 0
    assert "loaded with transformers' tensor parallelism (tp_size=2" in r.stderr and "delta:" in r.stderr
