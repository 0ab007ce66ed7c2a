"""HyLRA's layer-policy dynamic program (Ai et al., arXiv 2602.00777; reconstructed from the authors' UCM
"reuse-aware layer skipping" tool, methods.md 1.5).

Layers are visited in order. Each layer either *continues* the current anchor ``i`` (it reuses anchor
``i``'s top-k; gain ``A[i, j]``) or *switches*, becoming a new anchor (gain ``A[j, j] = 1``) at the cost
of one change. A path is a segmentation of the layer stack into runs headed by anchors; reuse layers
always reuse the most recent anchor. Paths are compared lexicographically by (minimum gain along the
path, sum of gains), with several calibration tables taken together (min and sum across tables).
``c <= c_max`` switches; layer 0 is an anchor for free. Rollback (sensitive) layers must be anchors.
"""
from __future__ import annotations

import itertools
import math

import torch


def _gain(tables: list[torch.Tensor], i: int, j: int) -> tuple[float, float]:
    vals = [float(A[i, j]) for A in tables]
    return min(vals), sum(vals)


def hylra_dp(overlap, c_max: int, rollback: set[int] | list[int] = ()) -> list[int]:
    """Solve the DP. ``overlap``: one [L, L] tensor or a list of them (upper-triangular fractions of
    layer j's selection found in layer i's, diagonal 1). Returns ``config``: length-L list, -1 for an
    anchor, else the index of the anchor the layer reuses."""
    tables = [torch.as_tensor(a, dtype=torch.float64) for a in (overlap if isinstance(overlap, (list, tuple)) else [overlap])]
    L = tables[0].shape[0]
    rollback = set(rollback)
    c_max = max(0, min(int(c_max), L - 1))
    NEG = (-math.inf, -math.inf)
    # dp[i][c] = (value, backpointer) after the current layer, anchor i, c switches
    dp = [[NEG] * (c_max + 1) for _ in range(L)]
    back: list[dict] = [dict() for _ in range(L)]
    dp[0][0] = _gain(tables, 0, 0)
    for j in range(1, L):
        new = [[NEG] * (c_max + 1) for _ in range(L)]
        for c in range(c_max + 1):
            if j not in rollback:  # continue with anchor i < j
                for i in range(j):
                    if dp[i][c] == NEG:
                        continue
                    gmin, gsum = _gain(tables, i, j)
                    cand = (min(dp[i][c][0], gmin), dp[i][c][1] + gsum)
                    if cand > new[i][c]:
                        new[i][c] = cand
                        back[j][(i, c)] = (i, c)
            if c >= 1:  # switch: j becomes an anchor
                best, arg = NEG, None
                for k in range(j):
                    if dp[k][c - 1] > best:
                        best, arg = dp[k][c - 1], k
                if arg is not None:
                    gmin, gsum = _gain(tables, j, j)
                    cand = (min(best[0], gmin), best[1] + gsum)
                    if cand > new[j][c]:
                        new[j][c] = cand
                        back[j][(j, c)] = (arg, c - 1)
        dp = new
    best, state = NEG, None
    for i in range(L):
        for c in range(c_max + 1):
            if dp[i][c] > best:
                best, state = dp[i][c], (i, c)
    if state is None:
        raise ValueError("no valid layer policy: the switch budget cannot make every rollback layer an anchor")
    anchors = [0] * L
    i, c = state
    for j in range(L - 1, 0, -1):
        anchors[j] = i
        i, c = back[j][(i, c)]
    anchors[0] = 0
    return [-1 if anchors[j] == j else anchors[j] for j in range(L)]


def path_value(overlap, config: list[int]) -> tuple[float, float]:
    """(min gain, sum of gains) of a config, for tests and reports."""
    tables = [torch.as_tensor(a, dtype=torch.float64) for a in (overlap if isinstance(overlap, (list, tuple)) else [overlap])]
    mn, sm = math.inf, 0.0
    for j, src in enumerate(config):
        i = j if src == -1 else src
        gmin, gsum = _gain(tables, i, j)
        mn, sm = min(mn, gmin), sm + gsum
    return mn, sm


def brute_force(overlap, c_max: int, rollback=()) -> tuple[float, float]:
    """Best (min, sum) over every valid segmentation (test oracle for small L)."""
    tables = [torch.as_tensor(a, dtype=torch.float64) for a in (overlap if isinstance(overlap, (list, tuple)) else [overlap])]
    L = tables[0].shape[0]
    best = (-math.inf, -math.inf)
    for bits in itertools.product([0, 1], repeat=L - 1):
        anchors = [0] + [j + 1 for j, b in enumerate(bits) if b]
        if len(anchors) - 1 > c_max or not set(rollback) <= set(anchors):
            continue
        cfg, cur = [], 0
        for j in range(L):
            if j in anchors:
                cur = j
                cfg.append(-1)
            else:
                cfg.append(cur)
        best = max(best, path_value(tables, cfg))
    return best
