"""The TPLA attention module that stands in for a DeepSeek-V2/V3 attention layer while patched.

Why a module swap and not transformers' attention registry: DeepSeek's attention expands the cached latents
into per-head keys and values *before* it calls the registered attention function, so an absorbed decode
over the latent cache (the whole point of MLA and TPLA) cannot be written as an attention function. accel
therefore swaps each ``self_attn`` for this module, which reuses the original's projections (they stay the
same objects) and is swapped back by ``remove()``.

Prefill (more than one new token, or nothing cached yet) is exact MLA from the stored latent (methods.md 3.4:
prefill runs in MLA mode); decode is TPLA over the sharded latent rows (``mla.tpla_decode``), or exact MLA for
layers whose mode is ``mla_exact``. The cache holds, per layer, ``[B, g, T, dc/g + dr]`` rows (one slice of the
rotated latent per shard, with the rotary key replicated, or ``dr/g`` of it with ``rope_mode="split"``) in an
``AccelCache`` (values are zero-width): each shard's bytes are ``1/g`` of the latent plus its rotary key.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import AccelError
from .mla import fold_weights, shard_bounds, shard_rows, split_kv_b, tpla_decode


class TPLAAttention(nn.Module):
    def __init__(self, orig: nn.Module, adapter, layer_idx: int, *, shards: int, transform: torch.Tensor | None,
                 mode: str = "tpla", rope_mode: str = "replicate", norm_mode: str = "full",
                 shard_logit_scale: float = 1.0, backend: str | None = None):
        super().__init__()
        self.tracker = None  # set by accel.tpla.patch: the take-over check's per-thread record
        self.orig = orig
        self.adapter = adapter
        self.layer_idx = layer_idx
        self.shards = int(shards)
        self.mode = mode
        self.rope_mode = rope_mode
        self.norm_mode = norm_mode
        self.shard_logit_scale = float(shard_logit_scale)
        self.backend = backend
        self.heads = orig.num_heads
        self.d_nope, self.d_rope, self.d_v = orig.qk_nope_head_dim, orig.qk_rope_head_dim, orig.v_head_dim
        self.d_c = orig.kv_lora_rank
        self.scaling = orig.scaling
        shard_bounds(self.d_c, self.shards)
        if rope_mode == "split":
            shard_bounds(self.d_rope, self.shards)
        w_uk, w_uv = split_kv_b(orig.kv_b_proj.weight.detach(), self.heads, self.d_nope, self.d_v)
        u = None if transform is None else transform.double()
        uk, uv = fold_weights(w_uk, w_uv, orig.kv_a_layernorm.weight.detach(), u)
        self.register_buffer("w_uk", uk, persistent=False)  # [H, dn, dc]
        self.register_buffer("w_uv", uv, persistent=False)  # [H, dv, dc]
        self.register_buffer("u", None if u is None else u.float(), persistent=False)
        self.eps = float(getattr(orig.kv_a_layernorm, "variance_epsilon", 1e-6))

    # -- latent ------------------------------------------------------------------------------------
    def latent(self, x: torch.Tensor, per_shard: bool = False) -> torch.Tensor:
        """Gain-free RMS-normalised latent in the rotated basis, fp32 ``[B, T, dc]``. ``per_shard``: each
        shard's slice normalised by its own RMS (``norm_mode="per_shard"``, decode tokens only)."""
        x = x.float()
        if self.u is not None:
            x = x @ self.u.T
        if not per_shard:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        parts = [x[..., a:b] * torch.rsqrt(x[..., a:b].pow(2).mean(-1, keepdim=True) + self.eps)
                 for a, b in shard_bounds(self.d_c, self.shards)]
        return torch.cat(parts, -1)

    def unshard(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, g, T, dk]`` shard rows -> full latent ``[B, T, dc]`` and rotary key ``[B, T, dr]``."""
        w = self.d_c // self.shards
        lat = torch.cat([rows[:, r, :, :w] for r in range(self.shards)], -1)
        if self.rope_mode == "split":
            kr = torch.cat([rows[:, r, :, w:] for r in range(self.shards)], -1)
        else:
            kr = rows[:, 0, :, w:]
        return lat, kr

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, position_embeddings=None, cache=None,
                **kwargs):
        # the decoder layer hands the cache over as ``cache=`` on transformers 5.24+, ``past_key_values=`` before
        past_key_values = cache if cache is not None else past_key_values
        if self.tracker is not None:  # the take-over check (accel.tpla.patch)
            self.tracker.calls += 1
            self.tracker.caches.append(past_key_values)
        a = self.orig
        B, T, _ = hidden_states.shape
        if a.q_lora_rank is None:
            q = a.q_proj(hidden_states)
        else:
            q = a.q_b_proj(a.q_a_layernorm(a.q_a_proj(hidden_states)))
        q = q.view(B, T, self.heads, self.d_nope + self.d_rope).transpose(1, 2)
        q_nope, q_rot = torch.split(q, [self.d_nope, self.d_rope], dim=-1)
        ckv = a.kv_a_proj_with_mqa(hidden_states)
        x, k_rot = torch.split(ckv, [self.d_c, self.d_rope], dim=-1)
        k_rot = k_rot.reshape(B, 1, T, self.d_rope)
        q_rot, k_rot = self.adapter.rope(a, q_rot, k_rot, position_embeddings)
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        decode = T == 1 and past > 0
        lat = self.latent(x, per_shard=decode and self.norm_mode == "per_shard" and self.mode == "tpla")
        rows = shard_rows(lat, k_rot[:, 0].float(), self.shards, self.rope_mode).to(hidden_states.dtype)
        if past_key_values is not None:
            rows, _ = past_key_values.update(rows, rows.new_empty(*rows.shape[:3], 0), self.layer_idx)
        if decode:
            o = tpla_decode(q_nope[:, :, 0], q_rot[:, :, 0], rows, self.w_uk, self.w_uv, scale=self.scaling,
                            reduce="outputs" if self.mode == "tpla" else "logits", rope_mode=self.rope_mode,
                            shard_logit_scale=self.shard_logit_scale if self.mode == "tpla" else 1.0,
                            valid=_valid_from_mask(attention_mask, rows.shape[2]), backend=self.backend)
            o = o[:, None]  # [B, 1, H, dv]
        else:
            o = self._mla(q_nope, q_rot, rows, attention_mask)
        out = a.o_proj(o.reshape(B, T, self.heads * self.d_v).to(hidden_states.dtype))
        return out, None

    def _mla(self, q_nope, q_rot, rows, attention_mask):
        """Exact MLA (naive form, transformers' SDPA) over every cached row: ``[B, T, H, dv]``."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        lat, kr = self.unshard(rows)
        B, S = lat.shape[:2]
        k_nope = torch.einsum("bsc,hnc->bhsn", lat.float(), self.w_uk)
        v = torch.einsum("bsc,hvc->bhsv", lat.float(), self.w_uv)
        key = torch.cat([k_nope, kr.float()[:, None].expand(B, self.heads, S, self.d_rope)], -1)
        query = torch.cat([q_nope.float(), q_rot.float()], -1)
        dtype = q_nope.dtype
        out, _ = sdpa_attention_forward(self.orig, query.to(dtype), key.to(dtype), v.to(dtype), attention_mask,
                                        dropout=0.0, scaling=self.scaling)
        return out

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, mode={self.mode}, shards={self.shards}, transform="
                f"{'identity' if self.u is None else 'orthogonal'}, rope_mode={self.rope_mode}, norm_mode={self.norm_mode}")


def _valid_from_mask(mask, length: int):
    """Decode-step attention mask -> ``[B, length]`` bool of attendable positions (None: all)."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() != 4:
        raise AccelError(f"tpla: unexpected attention mask of shape {tuple(mask.shape)} in decode")
    m = mask[:, 0, -1, :length]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2
