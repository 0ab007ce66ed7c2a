"""TPLA with real tensor parallelism: one ``torch.distributed`` rank per shard (gloo on CPU, NCCL on GPUs).

Launch with ``torchrun --nproc-per-node g ...``; every rank loads the model, then
``accel.patch(model, "tpla", shards=g, execution="distributed")`` keeps on each rank only its share:

* attention: the latent cache holds this rank's ``dc/g`` rotated latent channels plus the rotary key; the
  decode up-projections (``W_UK``, ``W_UV`` with the RMSNorm gain and the transform folded in) are split by latent
  channels and ``kv_b_proj`` by heads (``H/g`` per rank, for the head-parallel exact prefill). The query
  projection and ``o_proj``: ``attn_weights="replicate"`` (default) keeps them whole on every rank, so a decode
  layer needs exactly one all-reduce, the paper's form (every head is on every shard); ``"split"`` splits them
  by heads too (``1/g`` of those weights) at the price of an all-gather of the queries and a second all-reduce
  per layer [INFER: the trade-off is ours; with gloo each collective costs ~0.3-1.5 ms on this machine]. The small
  down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms are replicated.
* MLPs and MoE experts (routed and shared): the intermediate dimension is split (Megatron column/row), one
  all-reduce per MLP; the router runs on every rank on the same input, so every rank routes the same way.
* embeddings, final norm and LM head are replicated [INFER: a vocab-parallel head needs one more gather].

Decode step of a layer on rank ``r`` (methods.md 3.2): the shard kernel attends over the rank's latent slice for
every head, the rank projects its partial outputs through ``o_proj`` and one all-reduce sums the projections
(``split``: queries all-gathered, per-head outputs all-reduced, projected through the rank's ``o_proj`` slice,
all-reduced); ``mla_exact`` layers all-reduce the partial logits before one softmax as well. Prefill is
exact MLA, head-parallel (each rank computes its heads from the full latent of the prompt, which every rank
computes, and stores only its slice). Prefilling more tokens after a cached prefix is not supported here.

``remove()`` (collective: call it on every rank) all-gathers the slices and restores the original weights
exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import AccelError
from .attention import TPLAAttention, _valid_from_mask
from .mla import shard_bounds

# -- collectives --------------------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x)
    return x


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim)


class _Sliced:
    """Records a parameter replaced by its slice along ``dim`` so ``restore`` can all-gather it back."""

    def __init__(self, module: nn.Module, name: str, dim: int, parts: list[tuple[int, int]] | None = None):
        self.module, self.name, self.dim = module, name, dim
        self.full_shape = tuple(getattr(module, name).shape)
        self.parts = parts  # [(start, end), ...] per rank within dim (several blocks, e.g. gate and up halves)

    def apply(self, rank: int, world: int) -> None:
        p = getattr(self.module, self.name)
        n = p.shape[self.dim]
        if self.parts is None:
            self.parts = [(0, n)]
        pieces = []
        for a, b in self.parts:
            width = (b - a) // world
            pieces.append(p.detach().narrow(self.dim, a + rank * width, width))
        new = torch.cat(pieces, self.dim).clone()
        setattr(self.module, self.name, nn.Parameter(new, requires_grad=False))

    def restore(self) -> None:
        p = getattr(self.module, self.name).detach()
        world = dist.get_world_size()
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p.contiguous())
        blocks = []
        for j, (a, b) in enumerate(self.parts):
            width = (b - a) // world
            for g in gathered:
                off = sum((bb - aa) // world for aa, bb in self.parts[:j])
                blocks.append(g.narrow(self.dim, off, width))
        full = torch.cat(blocks, self.dim)
        assert tuple(full.shape) == self.full_shape
        setattr(self.module, self.name, nn.Parameter(full.clone(), requires_grad=False))


def _linear_slice(lin: nn.Linear, dim: int, records: list, parts=None) -> None:
    """dim 0: output features (column-parallel), dim 1: input features (row-parallel)."""
    records.append(_Sliced(lin, "weight", dim, parts))
    if lin.bias is not None and dim == 0:
        records.append(_Sliced(lin, "bias", 0, parts))


def shard_mlp(mlp: nn.Module, records: list) -> None:
    """Split an MLP / MoE block's intermediate dimension in place (records let ``remove`` undo it)."""
    if hasattr(mlp, "experts"):  # MoE: routed experts (3-D stacked weights) + shared experts
        ex = mlp.experts
        if not (hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj")):
            raise AccelError(f"tpla: unsupported expert layout {type(ex).__name__} for tensor parallelism")
        i2 = ex.gate_up_proj.shape[1]
        records.append(_Sliced(ex, "gate_up_proj", 1, [(0, i2 // 2), (i2 // 2, i2)]))
        records.append(_Sliced(ex, "down_proj", 2))
        if getattr(mlp, "shared_experts", None) is not None:
            shard_mlp(mlp.shared_experts, records)
        return
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear):
            raise AccelError(f"tpla: unsupported MLP {type(mlp).__name__} for tensor parallelism (no {name})")
    _linear_slice(mlp.gate_proj, 0, records)
    _linear_slice(mlp.up_proj, 0, records)
    _linear_slice(mlp.down_proj, 1, records)


def _mlp_all_reduce_hook(module, args, output):
    return _all_reduce(output)


class TPLATPAttention(TPLAAttention):
    """``TPLAAttention`` for one rank of a ``torch.distributed`` group: holds its heads' share of the
    projections and its latent channels' share of the cache (see the module docstring)."""

    def __init__(self, orig, adapter, layer_idx, *, rank: int, world: int, records: list,
                 attn_weights: str = "replicate", **kw):
        super().__init__(orig, adapter, layer_idx, shards=world, **kw)
        self.split_proj = attn_weights == "split"
        self.rank, self.world = rank, world
        H = self.heads
        if H % world:
            raise AccelError(f"tpla: {H} attention heads cannot be split over {world} ranks")
        self.h_loc = H // world
        a, b = shard_bounds(self.d_c, world)[rank]
        # decode up-projections: this rank's latent channels, every head (folded gain + transform)
        self.w_uk = self.w_uk[:, :, a:b].contiguous()
        self.w_uv = self.w_uv[:, :, a:b].contiguous()
        if self.u is not None:
            self.u = self.u[a:b].contiguous()  # rows of U for this rank's channels
        self.lat_range = (a, b)
        # this rank's rotary-key channels: all of them when replicated
        self.rope_range = shard_bounds(self.d_rope, world)[rank] if self.rope_mode == "split" else (0, self.d_rope)
        dq = self.d_nope + self.d_rope
        _linear_slice(orig.kv_b_proj, 0, records)  # head-parallel exact prefill
        if self.split_proj:
            q_lin = orig.q_proj if orig.q_lora_rank is None else orig.q_b_proj
            _linear_slice(q_lin, 0, records)
            _linear_slice(orig.o_proj, 1, records)
        self.dq = dq

    def latent_rows(self, x: torch.Tensor, k_rot: torch.Tensor, per_shard: bool) -> torch.Tensor:
        """This rank's cache rows ``[B, 1, T, dc/g + dr]`` from the full raw latent ``x``."""
        x = x.float()
        if per_shard:  # each rank normalises its own slice (no communication)
            y = x @ self.u.T if self.u is not None else x[..., self.lat_range[0]:self.lat_range[1]]
            lat = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            lat = n @ self.u.T if self.u is not None else n[..., self.lat_range[0]:self.lat_range[1]]
        kr = k_rot.float()[..., self.rope_range[0]:self.rope_range[1]]
        return torch.cat([lat, kr], -1)[:, None]

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, position_embeddings=None, cache=None,
                **kwargs):
        # the decoder layer hands the cache over as ``cache=`` on transformers 5.24+, ``past_key_values=`` before
        past_key_values = cache if cache is not None else past_key_values
        if self.tracker is not None:  # the take-over check (accel.tpla.patch)
            self.tracker.calls += 1
            self.tracker.caches.append(past_key_values)
        a = self.orig
        B, T, _ = hidden_states.shape
        q = a.q_proj(hidden_states) if a.q_lora_rank is None else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(hidden_states)))
        q = q.view(B, T, -1, self.dq).transpose(1, 2)  # every head (replicated) or this rank's heads (split)
        ckv = a.kv_a_proj_with_mqa(hidden_states)
        x, k_rot = torch.split(ckv, [self.d_c, self.d_rope], dim=-1)
        k_rot = k_rot.reshape(B, 1, T, self.d_rope)
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        decode = T == 1 and past > 0
        if T > 1 and past > 0:
            raise AccelError("tpla (distributed): prefilling more tokens after a cached prefix is not supported; "
                             "pass the whole prompt in one call (generate does)")
        heads = slice(self.rank * self.h_loc, (self.rank + 1) * self.h_loc)
        if decode and self.split_proj:
            q = _all_gather(q, 1)  # every head on every rank
        elif not decode and not self.split_proj:
            q = q[:, heads]  # prefill is head-parallel
        q_nope, q_rot = torch.split(q, [self.d_nope, self.d_rope], dim=-1)
        q_rot, k_rot = self.adapter.rope(a, q_rot, k_rot, position_embeddings)
        per_shard = decode and self.norm_mode == "per_shard" and self.mode == "tpla"
        rows = self.latent_rows(x, k_rot[:, 0], per_shard).to(hidden_states.dtype)
        if past_key_values is not None:
            rows, _ = past_key_values.update(rows, rows.new_empty(*rows.shape[:3], 0), self.layer_idx)
        if decode:
            o = self._decode(q_nope[:, :, 0], q_rot[:, :, 0], rows[:, 0], attention_mask)[:, None]  # [B, 1, H, dv]
            if self.split_proj:  # sum the shards' per-head outputs, then this rank's heads through its o_proj slice
                o = _all_reduce(o)[:, :, heads]
        else:
            o = self._prefill(q_nope, q_rot, x, k_rot, attention_mask)  # [B, T, h_loc, dv]
        o = o.reshape(B, T, -1).to(hidden_states.dtype)
        if self.split_proj or decode:  # o_proj sees what this rank holds: its heads' slice, or every head
            out = a.o_proj(o)
            if a.o_proj.bias is not None and not self.split_proj and self.rank != 0:
                out = out - a.o_proj.bias  # the bias is added once over the ranks
        else:  # replicated o_proj, head-parallel prefill: this rank's columns
            w = a.o_proj.weight[:, heads.start * self.d_v:heads.stop * self.d_v]
            out = torch.nn.functional.linear(o, w, a.o_proj.bias if self.rank == 0 else None)
        return _all_reduce(out), None

    def _decode(self, q_nope, q_rope, rows, attention_mask):
        from ..ops.latent import latent_decode

        w = self.lat_range[1] - self.lat_range[0]
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope.float(), self.w_uk)
        valid = _valid_from_mask(attention_mask, rows.shape[1])
        q_rope = q_rope[..., self.rope_range[0]:self.rope_range[1]]
        if self.mode == "tpla":
            q_r = torch.cat([q_lat, q_rope.float()], -1)
            o_lat, _ = latent_decode(q_r, rows, None, w, valid=valid, scale=self.scaling * self.shard_logit_scale,
                                     backend=self.backend)
        else:  # exact reduce: partial logits summed over ranks before one softmax
            s = torch.einsum("bhc,btc->bht", q_lat, rows[..., :w].float())
            rope = torch.einsum("bhc,btc->bht", q_rope.float(), rows[..., w:].float())
            s = s + rope if (self.rope_mode == "split" or self.rank == 0) else s  # a replicated key counts once
            s = _all_reduce(s) * self.scaling
            if valid is not None:
                s = s.masked_fill(~valid[:, None, : s.shape[-1]], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            o_lat = torch.einsum("bht,btc->bhc", p, rows[..., :w].float())
        return torch.einsum("bhc,hvc->bhv", o_lat, self.w_uv)  # this shard's part (summed by the caller)

    def _prefill(self, q_nope, q_rot, x, k_rot, attention_mask):
        """Exact MLA for this rank's heads over the prompt (the original module's maths)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        a = self.orig
        B, T = x.shape[:2]
        c = a.kv_a_layernorm(x)  # the model's own latent
        kv = a.kv_b_proj(c).view(B, T, self.h_loc, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.d_nope, self.d_v], dim=-1)
        key = torch.cat([k_nope, k_rot.expand(B, self.h_loc, T, self.d_rope)], -1)
        query = torch.cat([q_nope, q_rot], -1)
        out, _ = sdpa_attention_forward(a, query, key, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return out
