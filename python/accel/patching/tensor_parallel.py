"""Models loaded with transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under torchrun).

transformers shards the q/k/v projections by output rows (``colwise``) and the o projection by input rows
(``rowwise``, summed across ranks), so each rank's attention modules see a contiguous slice of the query heads and
of the KV heads (the query heads of a GQA group stay with their KV head). accel's attention function then runs on
that rank's heads only, and accel's cache holds that slice of the KV cache: the per-rank memory saving of tensor
parallelism carries over to every KV policy.

A policy runs under tensor parallelism only where each of its decisions is made per KV head from that head's own
query heads (``Policy.tensor_parallel_problem``): a rank then computes, on its heads, exactly what one process
computes on them. Policies that combine heads (DELTA's one page set per layer, RefreshKV's query averaged over all
heads, Task-KV's layer centre) are refused at ``accel.patch`` with the reason. Per-head plans (DuoAttention's head
ranking, MoA's spans) stay global; the policy reads its rank's heads at ``ModelRuntime.kv_offset``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import AccelError


@dataclass(frozen=True)
class HeadSlice:
    """This rank's heads: KV heads ``[kv_offset, kv_offset + num_kv_heads)`` and their query heads."""

    tp_size: int
    rank: int
    kv_offset: int
    num_kv_heads: int
    num_heads: int


def tensor_parallel_size(model) -> int:
    """transformers' tensor-parallel degree of ``model`` (1 when it was loaded without ``tp_plan``)."""
    tp = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1
    if tp == 1 and getattr(model, "_device_mesh", None) is not None:
        mesh = model._device_mesh
        names = getattr(mesh, "mesh_dim_names", None) or ()
        tp = int(mesh["tp"].size()) if "tp" in names else int(mesh.size())
    return int(tp)


def mesh_problem(model) -> str | None:
    """Why accel cannot serve a model on a device mesh with dimensions other than tensor parallelism (pipeline
    stages hold some of the layers, FSDP shards every weight): None when it can."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    other = {n: int(mesh[n].size()) for n in names if n != "tp" and int(mesh[n].size()) > 1}
    if not names and tensor_parallel_size(model) != int(mesh.size()):
        other = {"mesh": int(mesh.size())}
    if other:
        dims = ", ".join(f"{n}={s}" for n, s in sorted(other.items()))
        return (f"this model was loaded on a device mesh with {dims}: accel follows tensor parallelism (tp) only; "
                "load it with tp_plan / DistributedConfig(tp_size=...) alone, or in one process")
    return None


def _rows(w) -> tuple[int, int | None]:
    """(rows this rank holds, this rank's index on the weight's mesh or None when the weight is not sharded)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(w, DTensor):
        if len(w.placements) != 1 or not isinstance(w.placements[0], Shard) or w.placements[0].dim != 0:
            raise AccelError(f"a q/k/v projection is placed {tuple(w.placements)} on the device mesh; accel follows "
                             "transformers' 'colwise' sharding of q/k/v (Shard(0)) only: load the model with tp_plan='auto'")
        return int(w.to_local().shape[0]), int(w.device_mesh.get_local_rank())
    return int(w.shape[0]), None


def head_slice(model, adapter, info) -> HeadSlice | None:
    """The heads this rank's attention sees when ``model`` was loaded with transformers' tensor parallelism (None
    when it was not); raises ``AccelError`` (one line) where accel cannot follow the sharding."""
    tp = tensor_parallel_size(model)
    if tp == 1:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise AccelError(f"the model has tp_size={tp} but torch.distributed is not initialized; start the script with "
                         "torchrun and load the model there (from_pretrained(..., tp_plan='auto'))")
    if info.num_kv_heads % tp or info.num_heads % tp:
        raise AccelError(f"tensor parallelism over {tp} ranks does not split this model's {info.num_heads} query / "
                         f"{info.num_kv_heads} KV heads evenly; run it on a number of ranks that divides "
                         f"{info.num_kv_heads}, or in one process")
    H, Hkv = info.num_heads // tp, info.num_kv_heads // tp
    found = None
    for i, m in enumerate(adapter.attention_modules()):
        projs = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if any(p is None or getattr(p, "weight", None) is None for p in projs):
            raise AccelError("accel follows tensor parallelism on separate q/k/v projections (q_proj, k_proj, "
                             f"v_proj); layer {i}'s attention ({type(m).__name__}) has a packed or other layout: "
                             "run this model in one process")
        (rq, iq), (rk, ik), (rv, iv) = (_rows(p.weight) for p in projs)
        D = info.head_dim
        if (rq, rk, rv) == (info.num_heads * D, info.num_kv_heads * D, info.num_kv_heads * D):
            here = (0, info.num_kv_heads, info.num_heads, torch.distributed.get_rank())  # attention replicated
        elif (rq, rk, rv) == (H * D, Hkv * D, Hkv * D) and iq is not None and iq == ik == iv:
            here = (iq * Hkv, Hkv, H, iq)
        else:
            raise AccelError(f"layer {i}'s q/k/v projections hold {rq}/{rk}/{rv} rows on this rank, not the even "
                             f"split of {info.num_heads}/{info.num_kv_heads} heads x {D} over {tp} ranks that "
                             "accel follows: load the model with tp_plan='auto'")
        if found is not None and here[:3] != found[:3]:
            raise AccelError(f"layer {i} holds other heads on this rank than layer 0; accel needs the same head "
                             "slice in every layer: load the model with tp_plan='auto'")
        found = here
    off, hkv, h, rank = found
    return HeadSlice(tp_size=tp, rank=rank, kv_offset=off, num_kv_heads=hkv, num_heads=h)


def local_info(info, sl: HeadSlice | None):
    """``info`` with this rank's head counts (what the attention modules and accel's cache see)."""
    if sl is None:
        return info
    return replace(info, num_heads=sl.num_heads, num_kv_heads=sl.num_kv_heads)


def refuse_policies(parts, sl: HeadSlice | None, plan) -> None:
    """One line naming every part of the policy that cannot run on a rank's slice of the heads."""
    if sl is None:
        return
    problems = [f"{p.name}: {r}" for p in parts if (r := p.tensor_parallel_problem(plan))]
    if problems:
        raise AccelError(f"this model was loaded with transformers' tensor parallelism (tp_size={sl.tp_size}; each "
                         "rank holds a slice of the heads) and " + "; ".join(problems)
                         + "; choose a per-head policy (dense, streaming, snapkv, pyramidkv, h2o, duo, moa, quest, "
                           "hylra) or load the model without tp_plan")
