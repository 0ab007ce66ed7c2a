"""Attention masks in the forms accel's kernels take: a decode step's [B, T] validity from transformers' 4-D mask
(converted once per step and shared by the layers), a prompt's real tokens, each row's first real token."""
from __future__ import annotations

import torch


def valid_from_mask(attention_mask, batch: int, kv_len: int):
    """Turn a decode-step mask (bool or additive, [B|1, 1, 1, T]) into a [B, T] bool validity
    vector for the kernel. Returns (ok, valid): ok=False means the mask has a form the decode kernel
    does not take (per-head masks), and the caller must fall back."""
    if attention_mask is None:
        return True, None
    m = attention_mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1:
        return False, None
    m = m[:, 0, 0, :kv_len]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    if m.shape[0] != batch:
        m = m.expand(batch, -1)
    if m.shape[1] < kv_len:  # positions past the mask are valid (mask shorter than the cache view)
        m = torch.cat([m, m.new_ones(batch, kv_len - m.shape[1])], dim=1)
    if bool(m.all()):
        return True, None
    return True, m.contiguous()



def first_valid_positions(valid: torch.Tensor | None, B: int) -> torch.Tensor:
    """Index of each row's first attendable token ([B] int64; 0 without a mask)."""
    if valid is None:
        return torch.zeros(B, dtype=torch.long)
    return valid.int().argmax(dim=1).long().cpu()


def step_valid(ctx, attention_mask, B: int, T: int):
    """``valid_from_mask`` of this step's mask, converted once per step and shared by the layers (the model builds
    one mask per step and hands the same tensor to every layer)."""
    memo = ctx.runtime.shared.get("valid_mask")
    if memo is not None and memo[0] is attention_mask and memo[1] == T:
        return memo[2]
    res = valid_from_mask(attention_mask, B, T)
    ctx.runtime.shared["valid_mask"] = (attention_mask, T, res)
    return res



def prompt_valid(attention_mask, B: int, T: int) -> torch.Tensor | None:
    """[B, T] bool of real (non-padding) prompt tokens from a prefill mask, or None if all are real."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :T]  # the last query sees every real token
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2
    elif m.dim() == 2:
        m = m[:, -T:].bool()
    else:
        return None
    if m.shape[0] != B:
        m = m.expand(B, -1)
    if m.shape[1] < T:
        m = torch.cat([m.new_zeros(B, T - m.shape[1]), m], 1)
    return None if bool(m.all()) else m.contiguous()

