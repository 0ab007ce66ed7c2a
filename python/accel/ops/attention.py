"""Decode-attention op with backend dispatch.

Backends, in priority order for a tensor's device:
  CPU:  ``cpp`` (accel._C, OpenMP + vectorised C++) -> ``torch`` (pure-torch reference)
  CUDA: ``cuda`` (accel._C_cuda) -> ``triton`` (accel.kernels) -> ``torch``
``backend_report()`` explains why each backend is or is not usable (shown by ``accel info``).
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _ext
from ..config import forced_backend
from ._reference import decode_attention_ref


def _triton_reason() -> str:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not installed ({type(exc).__name__})"
    if not torch.cuda.is_available():
        return "triton is installed but no CUDA device is visible (CPU tensors run only under TRITON_INTERPRET=1, used in tests)"
    return ""


def backend_report() -> dict[str, str]:
    """Map backend name -> '' if usable, else the reason it is not."""
    return {
        "cpp": "" if _ext.HAS_CPU_EXT else _ext.CPU_EXT_REASON,
        "cuda": (
            "" if (_ext.HAS_CUDA_EXT and torch.cuda.is_available())
            else (_ext.CUDA_EXT_REASON or "no CUDA device is visible")
        ),
        "triton": _triton_reason(),
        "torch": "",
    }


_CHOICE: dict[tuple[str, str], str] = {}


def on_device(device: torch.device, *ts):
    """The auxiliary tensors (lengths, offsets, index lists, masks) on the data's device: accel keeps cache
    metadata on the CPU, and a GPU kernel must not be handed host pointers. None passes through."""
    return [t if t is None or t.device == device else t.to(device, non_blocking=True) for t in ts]


def choose_backend(device: torch.device) -> str:
    """Backend for tensors on ``device`` (memoised per device type and ACCEL_BACKEND value)."""
    forced = forced_backend()
    key = (device.type, forced)
    if key not in _CHOICE:
        _CHOICE[key] = _choose_backend(device, forced)
    return _CHOICE[key]


def _choose_backend(device: torch.device, forced: str) -> str:
    report = backend_report()
    if forced != "auto":
        if report[forced]:
            from ..errors import AccelError

            raise AccelError(f"ACCEL_BACKEND={forced} cannot run: {report[forced]}")
        return forced
    order = ["cpp", "torch"] if device.type == "cpu" else ["cuda", "triton", "torch"]
    for name in order:
        if not report[name]:
            return name
    return "torch"


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    indices: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    scores: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
):
    """Attention of one new query per sequence over a KV cache.

    Args:
        q: [B, H, D] queries (any float dtype; computed in fp32).
        k, v: [B, Hkv, T, D] keys/values (fp32 or bf16), contiguous in D; any strides otherwise, so
            views of accel's preallocated cache are passed without a copy.
        lengths: [B, Hkv] int32 tokens attended per KV head (default: all T).
        indices: optional [B, Hkv, S] int32 token positions (sparse decode), or [B, 1, S] for one set
            shared by all KV heads of the layer; ``lengths`` then counts the valid entries of each list.
        valid: optional [B, T'] bool: False marks positions to skip (padding, windows).
        scale: softmax scale (default 1/sqrt(D)).
        scores: optional fp32 [B, H, >=T] buffer that receives the scaled logits ``q.k * scale`` of
            every attended token at its token position (-inf where masked); with ``return_lse`` the
            attention probabilities are ``exp(scores - lse)``. Layer-reuse anchors select from them
            without a second pass over K (C++ backend fused; other backends compute them in torch).
        offsets: optional [B, Hkv] int64: k and v are then ragged row pools [R, D] (accel's compressed
            cache, ``accel.cache.ragged``) and token ``t`` of head (b, h) is row ``offsets[b, h] + t``;
            ``indices`` are then positions inside each head's segment. ``valid`` is not allowed
            with a pool (a compressed cache holds no padding).
        head_mask: optional int64 [B, Hkv, S] with ``indices`` [B, Hkv, S]: query head ``h * G + g`` attends only
            the entries whose bit ``g`` is set, so a GQA group's query heads attend to different token sets while
            the C++ kernel reads each listed row once for all of them (Quest's per-query-head pages, agg="none").
            The GPU backends run one call per query head of the group.
    Returns:
        out [B, H, D] in q's dtype, and lse [B, H] (fp32) if ``return_lse``.
    """
    if head_mask is not None:
        from ..errors import AccelError

        if indices is None or offsets is not None or scores is not None:
            raise AccelError("head_mask needs indices, over a cache (not a ragged pool) and without scores")
        if head_mask.dtype != torch.int64 or head_mask.shape != indices.shape or indices.shape[1] != k.shape[1]:
            raise AccelError(f"head_mask must be int64 shaped like indices [B, Hkv, S], got {tuple(head_mask.shape)} "
                             f"{head_mask.dtype} for indices {tuple(indices.shape)}")
    if offsets is not None:
        return _pooled(q, k, v, lengths, offsets, indices=indices, valid=valid, scale=scale,
                       return_lse=return_lse, backend=backend, scores=scores)
    B, H, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if lengths is None:
        lengths = torch.full((B, Hkv), k.shape[2], dtype=torch.int32, device=k.device)
    if indices is not None and indices.shape[1] == 1 and Hkv > 1:  # one set shared by the whole layer
        indices = indices.expand(B, Hkv, indices.shape[2]).contiguous()
        lengths = lengths.reshape(B, -1)[:, :1].expand(B, Hkv).contiguous()
    backend = backend or choose_backend(q.device)
    if backend in ("cuda", "triton"):
        lengths, indices, valid = on_device(k.device, lengths, indices, valid)
        if head_mask is not None:
            return per_query_head(q, k, v, lengths, indices, head_mask.to(k.device), valid, scale, return_lse, backend)
    if scores is not None and backend != "cpp":
        _scores_torch(q, k, lengths, indices, valid, scale, scores)
    if backend == "cpp":
        qf = q if q.dtype == torch.float32 else q.float()
        if lengths.dtype != torch.int32:
            lengths = lengths.to(torch.int32)
        if torch.compiler.is_compiling() and indices is None and not return_lse and scores is None:
            from .library import ensure_ops

            ensure_ops()  # a node of the compiled graph instead of a graph break
            return torch.ops.accel.decode_attention(qf, k, v, lengths, valid, scale).to(q.dtype)
        fn = _ext.cpu_ext().decode_attention
        if head_mask is not None and not _masks_heads(fn):  # a build before the kernel's head mask
            return per_query_head(q, k, v, lengths, indices, head_mask, valid, scale, return_lse, backend)
        mask = {} if head_mask is None else {"head_mask": head_mask.contiguous()}
        res = fn(qf, k, v, lengths, indices, valid, scale, return_lse, 0, scores, **mask)
        out = res[0] if q.dtype == torch.float32 else res[0].to(q.dtype)
        return (out, res[1]) if return_lse else out
    if backend == "cuda":
        res = _ext.cuda_ext().decode_attention(q, k, v, lengths, indices, valid, scale, 4, None)
        out = res[0].to(q.dtype)
        return (out, res[1]) if return_lse else out
    if backend == "triton":
        from accel.kernels.attention.decode import decode_attention_triton

        res = decode_attention_triton(q, k, v, lengths, indices=indices, valid=valid, scale=scale)
        return res if return_lse else res[0]
    res = decode_attention_ref(q, k, v, lengths, indices=indices, valid=valid, scale=scale, return_lse=return_lse,
                               head_mask=head_mask)
    if return_lse:
        return res[0].to(q.dtype), res[1]
    return res.to(q.dtype)


@functools.lru_cache(maxsize=4)
def _masks_heads(decode_attention_cpp) -> bool:
    """Whether a built C++ ``decode_attention`` takes a ``head_mask``."""
    return "head_mask" in (decode_attention_cpp.__doc__ or "")


def per_query_head(q, k, v, lengths, indices, head_mask, valid, scale, return_lse, backend):
    """``decode_attention`` with a ``head_mask`` as one call per query head g of each group, over the entries whose
    bit g is set (the backends without a head mask of their own; every backend gives the same attention)."""
    B, H, _ = q.shape
    Hkv, S = k.shape[1], indices.shape[2]
    G = H // Hkv
    at = torch.arange(S, device=indices.device)
    live = at < lengths.reshape(B, Hkv, 1).to(indices.device)
    outs, lses = [], []
    for g in range(G):
        on = live & (((head_mask >> g) & 1) != 0)
        n = on.sum(-1)
        order = torch.sort((~on).to(torch.int8), dim=-1, stable=True).indices  # head g's entries first, in order
        idx_g = torch.where(at < n.unsqueeze(-1), indices.gather(2, order), -1).to(torch.int32)
        out, lse = decode_attention(q[:, g::G].contiguous(), k, v, n.to(torch.int32), indices=idx_g, valid=valid,
                                    scale=scale, return_lse=True, backend=backend)
        outs.append(out)
        lses.append(lse)
    out = torch.stack(outs, 2).reshape(B, H, -1)  # [B, Hkv, G, Dv]: query head kh * G + g
    return (out, torch.stack(lses, 2).reshape(B, H)) if return_lse else out


def _pooled(q, k, v, lengths, offsets, *, indices, valid, scale, return_lse, backend, scores):
    """Decode attention over a ragged row pool (see ``decode_attention``'s ``offsets``)."""
    from ..errors import AccelError

    B, H, D = q.shape
    if k.dim() != 2 or v.dim() != 2 or k.shape[0] != v.shape[0]:
        raise AccelError(f"with offsets, k and v must be row pools [R, D] of equal R, got {tuple(k.shape)} and {tuple(v.shape)}")
    if valid is not None:
        raise AccelError("valid masks are not supported over a ragged pool (a compressed cache holds no padding)")
    offsets = offsets.reshape(B, -1)
    Hkv = offsets.shape[1]
    R = k.shape[0]
    if lengths is None:
        raise AccelError("lengths are required with offsets")
    lengths = lengths.reshape(B, Hkv)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    backend = backend or choose_backend(q.device)
    if backend in ("cuda", "triton"):
        lengths, offsets, indices = on_device(k.device, lengths, offsets, indices)
    if k.stride(1) != 1 or v.stride(1) != 1:
        raise AccelError("with offsets, k and v rows must be contiguous")
    # zero batch/head strides even where B or Hkv is 1 (expand keeps the stride of size-1 dims)
    kx = torch.as_strided(k, (B, Hkv, R, k.shape[1]), (0, 0, k.stride(0), 1))
    vx = torch.as_strided(v, (B, Hkv, R, v.shape[1]), (0, 0, v.stride(0), 1))
    if indices is not None and indices.shape[1] == 1 and Hkv > 1:
        indices = indices.expand(B, Hkv, indices.shape[2]).contiguous()
        lengths = lengths[:, :1].expand(B, Hkv).contiguous()
    if backend == "cpp":
        qf = q if q.dtype == torch.float32 else q.float()
        res = _ext.cpu_ext().decode_attention(qf, kx, vx, lengths.to(torch.int32).contiguous(), indices, None, scale,
                                              return_lse, 0, scores, offsets.to(torch.int64).contiguous())
        out = res[0] if q.dtype == torch.float32 else res[0].to(q.dtype)
        return (out, res[1]) if return_lse else out
    if backend == "cuda":
        res = _ext.cuda_ext().decode_attention(q, kx, vx, lengths, indices, None, scale, 4, offsets)
        if scores is not None:
            _scores_pooled(q, k, lengths, offsets, indices, scale, scores)
        out = res[0].to(q.dtype)
        return (out, res[1]) if return_lse else out
    if backend == "triton":
        from accel.kernels.attention.decode import decode_attention_triton

        res = decode_attention_triton(q, kx, vx, lengths, indices=indices, scale=scale, offsets=offsets)
        if scores is not None:
            _scores_pooled(q, k, lengths, offsets, indices, scale, scores)
        return res if return_lse else res[0]
    # torch: gather each head's segment into a padded [B, Hkv, S, D] view and use the reference
    kk, vv, n = unpool(k, v, offsets, lengths, indices)
    if scores is not None:
        _scores_pooled(q, k, lengths, offsets, indices, scale, scores)
    res = decode_attention_ref(q, kk, vv, lengths, indices=indices, scale=scale, return_lse=return_lse)
    if return_lse:
        return res[0].to(q.dtype), res[1]
    return res.to(q.dtype)


def unpool(k, v, offsets, lengths, indices=None):
    """Copy each head's segment of a ragged row pool into a padded [B, Hkv, S, D] tensor (S = the
    longest segment addressed; rows past a segment are clamped copies, masked by ``lengths``)."""
    B, Hkv = offsets.shape
    R = k.shape[0]
    if indices is not None:
        used = torch.arange(indices.shape[-1], device=indices.device).view(1, 1, -1) < lengths.to(indices.device).view(B, Hkv, 1)
        S = int(torch.where(used, indices.long(), 0).max().item()) + 1 if indices.numel() else 1
    else:
        S = max(1, int(lengths.max().item()) if lengths.numel() else 1)
    rows = (offsets.view(B, Hkv, 1).long() + torch.arange(S, device=offsets.device).view(1, 1, S)).clamp(0, max(R - 1, 0))
    return k[rows], v[rows], S


def _scores_pooled(q, k, lengths, offsets, indices, scale, out):
    kk, _, S = unpool(k, k, offsets.reshape(q.shape[0], -1), lengths, indices)
    _scores_torch(q, kk, lengths, indices, None, scale, out)


def _scores_torch(q, k, lengths, indices, valid, scale, out):
    """Fill ``out`` [B, H, >=T] with the scaled logits of the attended tokens (-inf elsewhere): the
    non-fused twin of the C++ kernel's ``scores`` output."""
    B, H, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    s = torch.einsum("bhgd,bhtd->bhgt", q.float().view(B, Hkv, G, D), k.float()).reshape(B, H, T) * scale
    keep = torch.zeros(B, Hkv, T, dtype=torch.bool, device=k.device)
    if indices is None:
        keep |= torch.arange(T, device=k.device).view(1, 1, -1) < lengths.view(B, Hkv, 1).to(k.device)
    else:
        n = indices.shape[-1]
        used = torch.arange(n, device=k.device).view(1, 1, -1) < lengths.view(B, Hkv, 1).to(k.device)
        ext = torch.zeros(B, Hkv, T + 1, dtype=torch.bool, device=k.device)  # slot T takes unused entries
        ext.scatter_(2, torch.where(used, indices.long().clamp(0, T - 1), T), True)
        keep = ext[:, :, :T]
    if valid is not None:
        v = valid.bool()[:, :T]
        if v.shape[1] < T:
            v = torch.cat([v, v.new_ones(B, T - v.shape[1])], 1)
        keep &= v.view(B, 1, T)
    out.fill_(float("-inf"))
    out[:, :, :T] = s.masked_fill(~keep.repeat_interleave(G, 1), float("-inf"))
