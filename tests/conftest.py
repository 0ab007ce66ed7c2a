import os

import pytest
import torch

import accel
from accel import compat
from accel.plan import LayerPlan, Plan

torch.set_num_threads(1)
os.environ.setdefault("ACCEL_CACHE_DIR", os.path.expanduser("~/.cache/accel"))



def pytest_report_header(config):
    import transformers

    return f"transformers {transformers.__version__} ({transformers.__file__})"


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


def tiny_config(arch: str):
    """2-4 layer random models with GQA (G=2) built from configs: no download."""
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return T.LlamaConfig(num_hidden_layers=2, **common)
    if arch == "mistral":  # sliding window on every layer, small enough to be exercised
        return T.MistralConfig(num_hidden_layers=2, sliding_window=16, **common)
    if arch == "qwen2":
        return T.Qwen2Config(num_hidden_layers=2, **common)
    if arch == "qwen3":
        return T.Qwen3Config(num_hidden_layers=2, head_dim=16, **common)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=16,
                                  layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                               "full_attention"], query_pre_attn_scalar=16, **common)
    if arch == "phi3":
        return T.Phi3Config(num_hidden_layers=2, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa", dtype=dtype)
    return m.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


# -- helpers shared by the test modules (imported with ``from .conftest import ...``) --------------------------------
def model4(arch="llama", seed=0):
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=4, **common)
    elif arch == "qwen3":
        cfg = T.Qwen3Config(num_hidden_layers=4, head_dim=16, **common)
    elif arch == "gemma3_text":
        cfg = T.Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                                 **common)
    elif arch == "phi3":
        cfg = T.Phi3Config(num_hidden_layers=4, **common)
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def hand_plan(n=4, sliding=()):
    layers = [LayerPlan(mode="full"), LayerPlan(mode="reuse", reuse_src=0), LayerPlan(mode="select"),
              LayerPlan(mode="reuse", reuse_src=2)][:n]
    return Plan(policy="hylra", num_layers=n, num_kv_heads=2, layers=layers)


def left_padded(B=3, L=40, pads=(0, 7, 19), seed=0, high=256):
    """Random token ids [B, L] with row b left-padded by pads[b] zeros, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, high, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def gen(m, ids, policy, mask=None, new=12, **kw):
    with accel.patch(m, policy, **kw):
        return m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                          output_scores=True, pad_token_id=0)


def same(a, b, tol=1e-5):
    return torch.equal(a.sequences, b.sequences) and max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) <= tol


# MLA (DeepSeek-V2/V3) models for TPLA
def tiny_mla(version=3, q_lora=48, seed=0, layers=3, dc=32):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
              first_k_dense_replace=1, kv_lora_rank=dc, q_lora_rank=q_lora, qk_rope_head_dim=8, v_head_dim=16,
              qk_nope_head_dim=16, max_position_embeddings=512, eos_token_id=None, pad_token_id=0)
    if version == 3:
        m = DeepseekV3ForCausalLM(DeepseekV3Config(n_group=1, topk_group=1, **kw)).eval()
    else:
        m = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).eval()
    with torch.no_grad():  # a non-trivial latent RMSNorm gain, so its folding is tested
        for layer in m.model.layers:
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return m


def mla_prompt(batch=2, n=24, pad=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        ids[0, :pad] = 0
        mask[0, :pad] = 0
    return ids, mask


def decode_logits(m, ids, mask, steps=3):
    """Prefill on all but the last ``steps`` tokens, then feed them one by one: every step's logits."""
    out = []
    with torch.no_grad():
        n = ids.shape[1] - steps
        o = m(input_ids=ids[:, :n], attention_mask=mask[:, :n], use_cache=True)
        out.append(o.logits[:, -1])
        pkv = compat.output_cache(o)
        for t in range(n, ids.shape[1]):
            o = m(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True,
                  **compat.cache_kwargs(m, pkv))
            out.append(o.logits[:, -1])
    return torch.stack(out, 1)
