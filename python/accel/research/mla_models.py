"""Random-weight DeepSeek configs for TPLA's tests and benchmarks (no MLA weights install here).

``random_mla("tiny")`` is the test model; ``random_mla("mid")`` is the benchmark model: DeepSeek-V3 layout with
real MLA dimensions (kv_lora_rank 512, rope 64, nope 128, v 128, q_lora 768) at 16 heads, hidden 1024, 8 dense-MLP
layers and an 8K vocabulary (~150M parameters). Seeded, so every rank of a distributed run builds the same
weights."""
from __future__ import annotations

import torch

SIZES = {
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16,
                 qk_nope_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1),
    "mid": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
                num_hidden_layers=8, num_attention_heads=16, kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64,
                v_head_dim=128, qk_nope_head_dim=128, n_routed_experts=8, num_experts_per_tok=2,
                first_k_dense_replace=8),
}


def random_mla(size: str = "mid", seed: int = 0, max_positions: int = 65536):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from ..errors import AccelError

    if size not in SIZES:
        raise AccelError(f"unknown random MLA size {size!r}; choose one of {sorted(SIZES)}")
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(num_key_value_heads=SIZES[size]["num_attention_heads"], n_shared_experts=1, n_group=1,
                           topk_group=1, max_position_embeddings=max_positions, eos_token_id=None, pad_token_id=0,
                           **SIZES[size])
    return DeepseekV3ForCausalLM(cfg).eval()


def synthetic_cache(handle, context: int, batch: int = 1, seed: int = 0):
    """An ``AccelCache`` holding ``context`` tokens of structured latents (``errors.structured_latents``: low
    rank + outlier channels) in every layer of a TPLA-patched model, laid out exactly as prefill would store
    them (this rank's shard only, in distributed execution). For decode benchmarks at lengths whose prefill
    would take too long on a CPU."""
    from ..cache.accel_cache import AccelCache
    from ..tpla.distributed import TPLATPAttention
    from .tpla_errors import structured_latents
    from ..tpla.mla import shard_rows

    mods = handle.modules
    cache = AccelCache(num_layers=len(mods), reserve=context + 64)
    for i, mod in enumerate(mods):
        g = torch.Generator().manual_seed(seed + i)
        x = structured_latents(batch * context, mod.d_c, seed=seed + 1000 * i).view(batch, context, mod.d_c)
        kr = torch.randn(batch, context, mod.d_rope, generator=g)
        if isinstance(mod, TPLATPAttention):
            rows = mod.latent_rows(x, kr, False)
        else:
            rows = shard_rows(mod.latent(x), kr, mod.shards, mod.rope_mode)
        cache.update(rows.contiguous(), rows.new_empty(*rows.shape[:3], 0), i)
        del x, rows
    return cache


class ByteTokenizer:
    """UTF-8 bytes -> ids 3..258 (0 pad, 1 BOS, 2 EOS), for the random MLA models, which ship no tokenizer.
    Left padding; ids a random model generates outside the byte range decode to nothing."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    padding_side = "left"

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[1] + [b + 3 for b in t.encode("utf-8")] for t in ([texts] if isinstance(texts, str) else texts)]
        n = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [bytes(int(i) - 3 for i in row if 3 <= int(i) < 259).decode("utf-8", "replace") for row in ids]


RANDOM_MODELS = {"random-mla-tiny": "tiny", "random-mla-mid": "mid"}
