"""Measurement helpers shared by the CLI and bench/: timing of generate(), bandwidth, machine facts."""
from __future__ import annotations

import platform
import time

import torch


class TimingStreamer:
    """A ``generate()`` streamer that timestamps tokens: the first ``put`` is the prompt, the second
    the first new token (end of prefill), every later one a decode step."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        self.t_end = time.perf_counter()

    @property
    def prefill_s(self) -> float:
        return self.stamps[1] - self.t0 if len(self.stamps) > 1 else float("nan")

    @property
    def decode_steps(self) -> int:
        return max(0, len(self.stamps) - 2)

    @property
    def decode_s(self) -> float:
        return self.stamps[-1] - self.stamps[1] if len(self.stamps) > 2 else float("nan")

    def decode_step_ms(self) -> float:
        return 1e3 * self.decode_s / max(1, self.decode_steps)


class PeakRSS:
    """Peak resident memory (bytes) of this process while the ``with`` block runs, sampled from
    /proc/self/statm every ``interval`` seconds by a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.start = 0

    @staticmethod
    def rss() -> int:
        import os

        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def __enter__(self):
        import threading

        self.start = self.peak = self.rss()
        self._stop = threading.Event()

        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                self._stop.wait(self.interval)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())
        return False


def measure_read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Single-threaded read bandwidth (GB/s) from ``sum`` over a buffer far larger than the caches."""
    x = torch.ones(mb * 1024 * 1024 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


_EVICT: dict = {}


def evict_caches(mb: int = 128) -> None:
    """Stream through a buffer several times the size of the last-level cache so that data a kernel
    touched before is no longer cached (the state a KV cache is in at each layer of a decode step)."""
    buf = _EVICT.get(mb)
    if buf is None:
        buf = _EVICT[mb] = torch.ones(mb * 1024 * 1024 // 4)
    buf.sum()


def flush_tensors(tensors) -> bool:
    """Flush exactly these tensors' storage from every cache level with the C++ extension's x86
    ``clflush``; returns False (nothing done) without the extension or on other architectures."""
    from accel import _ext

    C = _ext.cpu_ext()
    if C is None or not hasattr(C, "flush_cache_lines"):
        return False
    return all([C.flush_cache_lines(t) for t in tensors])


def cold_call_time(fn, repeats: int = 15, flush=None) -> float:
    """Median seconds of ``fn()`` with data evicted before every call.

    ``flush=None`` evicts everything (streams 128 MB): data, code and the framework's own state all
    start cold, an upper bound on a call's cost. ``flush=[tensors]`` evicts exactly those tensors
    (a layer's K/V cache) and leaves code and small metadata warm, the state one layer's attention
    runs in during a real decode step, where the previous layer just ran the same code; it falls back
    to full eviction where lines cannot be flushed.
    """
    fn()
    times = []
    for _ in range(repeats):
        if flush is None or not flush_tensors(flush):
            evict_caches()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def measure_row_read_bandwidth(buf: torch.Tensor, rows: torch.Tensor, repeats: int = 15, flush_only_buf: bool = False) -> float:
    """Bandwidth (GB/s) of reading exactly the given rows of ``buf`` (a contiguous 2-D fp32 tensor) and
    doing nothing else, from cold caches: the ceiling for a kernel that reads those rows (sparse
    decode over selected K/V rows). Passing the kernel's own K/V buffer and row indices keeps the
    buffer size, density and DRAM-page locality of the real access. Measured by the C++ probe (best
    of software-prefetch distances 0 to 64 rows, median over ``repeats`` cold calls); needs the
    extension and raises :class:`RuntimeError` without it. ``flush_only_buf``: evict only ``buf``
    before each call (see :func:`cold_call_time`), to compare with kernels timed the same way."""
    from accel import _ext

    C = _ext.cpu_ext()
    if C is None or not hasattr(C, "scattered_read_probe"):
        raise RuntimeError("the scattered-read probe needs accel's C++ extension: pip install -e .")
    rows = rows.to(torch.int32).contiguous()
    fl = [buf] if flush_only_buf else None
    best = min(cold_call_time(lambda d=d: C.scattered_read_probe(buf, rows, d), repeats, fl) for d in (0, 4, 8, 16, 32, 64))
    return rows.numel() * buf.shape[1] * buf.element_size() / best / 1e9


def measure_copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (GB/s), counting bytes read + bytes written."""
    x = torch.ones(mb * 1024 * 1024 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes of parameters a decode step reads (shared/tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    # the input embedding reads one row per token, not the matrix, unless it is tied to the LM head
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_read(model, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """KV bytes one dense decode step reads at ``context`` tokens (sliding layers read their window)."""
    from .models.registry import get_adapter

    info = get_adapter(model).info()
    total = 0
    for w in info.sliding_windows:
        t = min(context, w) if w else context
        total += 2 * batch * info.num_kv_heads * t * info.head_dim * dtype_bytes
    return total


def _build_isa() -> str:
    """The vector instructions accel's C++ kernels were compiled for (AVX512 / AVX2 / baseline), or torch's CPU
    capability prefixed "torch:" when the extension is not built."""
    from . import _ext

    if _ext.HAS_CPU_EXT:
        return _ext.cpu_ext().build_isa()
    return "torch:" + torch.backends.cpu.get_cpu_capability()


def machine_facts() -> dict:
    import transformers

    from ._version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": _build_isa(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accel": __version__,
    }
