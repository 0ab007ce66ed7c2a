"""Shared helpers for the micro-benchmarks: best-of timing over a working set larger than the
caches, CSV writing with machine facts."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from accel.perf import machine_facts, measure_copy_bandwidth, measure_read_bandwidth


def best_time(fn, args_list, repeats: int = 3) -> float:
    """Seconds per call, best of ``repeats`` sweeps over ``args_list`` (distinct buffers, so each call
    streams from DRAM rather than cache)."""
    for a in args_list[:2]:
        fn(*a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for a in args_list:
            fn(*a)
        best = min(best, (time.perf_counter() - t) / len(args_list))
    return best


def bandwidths() -> tuple[float, float]:
    return measure_read_bandwidth(), measure_copy_bandwidth()


def write_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    rows = [{**r, **facts} for r in rows]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def set_threads(n: int = 1) -> None:
    torch.set_num_threads(n)
