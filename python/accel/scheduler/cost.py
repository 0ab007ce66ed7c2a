"""The decode cost model: a step's time predicted from what each layer does, fitted to steps measured on this machine.

A decode step of a patched model costs the part that does not depend on the context (the weights, norms, the
per-layer Python, a full layer's fixed attention cost: ``base_ms``) plus, per layer, the work of its attention
*kind* (``KINDS``), linear in the keys it touches:

* ``full``: exact attention over the layer's ``T`` cached keys (a sliding-window layer's window): ``full_slope * keys``;
* ``select``: scores over all ``T`` keys, selects ``k`` of them, attends to those (HyLRA / UCM select layers):
  ``select_fixed + select_scan * T-keys + sparse_attend * k-keys``;
* ``reuse``: attends to an anchor's selection of ``k`` keys: ``reuse_fixed + sparse_attend * k-keys`` (the same
  gathered-attention kernel as ``select``, so one slope);
* ``donor``: full attention that also scores and selects for the reuse layers pointing at it:
  ``donor_fixed + donor_slope * T-keys``;
* ``kv_scored`` / ``kv_plain``: a KV-compressed layer attending to the tokens each KV head holds, with per-step
  attention accumulation for scored eviction (SnapKV, H2O) or without it (StreamingLLM, DuoAttention-style heads):
  ``fixed + slope * held-keys``;

and ``unstacked_ms`` once per step when the step runs layer by layer instead of accel's fused whole-stack decode
(policies with their own decode, HyLRA among them).

"keys" counts rows x KV heads x tokens, in millions (``held-keys`` sums each head's own count). Every coefficient is
fitted per measured batch size (the kernels parallelise over rows x heads, so the per-key cost changes with the batch)
and interpolated linearly between measured batch sizes, never extrapolated. Coefficients are least-squares fits
(``fit``) of steps measured by ``accel.scheduler.measure.calibrate_cost`` (``accel calibrate-cost``), stored as
versioned JSON with the machine's facts; ``cost_model_for`` refuses a model, device, dtype or machine it was not
measured for, ``CostModel.predict`` a placeholder, a batch size outside the measured ones and a decode path never
measured.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AccelError

COST_SCHEMA_VERSION = 1
KINDS = ("full", "select", "reuse", "donor", "kv_scored", "kv_plain")
#: the coefficients of one batch size, in the order of the design matrix (``features``)
TERMS = ("base_ms", "unstacked_ms", "full_slope",
         "select_fixed", "select_scan", "sparse_attend",
         "reuse_fixed",
         "donor_fixed", "donor_slope",
         "kv_scored_fixed", "kv_scored_slope",
         "kv_plain_fixed", "kv_plain_slope")
#: terms that may stay unmeasured when every calibration run shares their value (a model whose decode never runs the
#: fused stack): their coefficient is 0 and ``predict`` refuses a step that would need them
OPTIONAL = ("unstacked_ms",)


@dataclass
class LayerWork:
    """What one decoder layer's attention does in a decode step, per row: its kind, the keys it scans (every KV head's
    full context for ``select`` / ``donor``) and the keys it attends to (per KV head, averaged over heads; for ``kv_*``
    the mean of the heads' held tokens)."""

    kind: str
    scan: float = 0.0
    attend: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise AccelError(f"layer work kind {self.kind!r} is not one of {KINDS}")


@dataclass
class StepWork:
    """A decode step: every layer's work and whether the step runs accel's fused whole-stack decode (one C++ call for
    all layers; policies with their own decode run layer by layer, which costs a fixed amount more per step)."""

    layers: list[LayerWork]
    stacked: bool = True


def features(work: StepWork, batch: int, num_kv_heads: int) -> dict[str, float]:
    """The design-matrix row of one step: how many layers of each kind (fixed terms), whether the step runs layer by
    layer, and the keys in millions of row x KV head x token (slope terms). ``base_ms`` is 1."""
    m = batch * num_kv_heads / 1e6
    f = {t: 0.0 for t in TERMS}
    f["base_ms"] = 1.0
    f["unstacked_ms"] = 0.0 if work.stacked else 1.0
    for w in work.layers:
        if w.kind == "full":
            f["full_slope"] += m * w.attend
        elif w.kind == "select":
            f["select_fixed"] += 1
            f["select_scan"] += m * w.scan
            f["sparse_attend"] += m * w.attend
        elif w.kind == "reuse":
            f["reuse_fixed"] += 1
            f["sparse_attend"] += m * w.attend
        elif w.kind == "donor":
            f["donor_fixed"] += 1
            f["donor_slope"] += m * w.scan
        else:
            f[f"{w.kind}_fixed"] += 1
            f[f"{w.kind}_slope"] += m * w.attend
    return f


@dataclass
class CostModel:
    """Fitted decode-step costs of one model on one machine (see the module doc). ``per_batch`` maps a measured batch
    size to its coefficients (``TERMS``)."""

    model: str
    model_type: str
    #: the model's fingerprint (architecture, layer / head counts, widths, vocabulary): which models it serves
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    machine: dict[str, Any]
    #: False for a placeholder (a GPU kind nobody has measured yet): ``predict`` refuses it
    measured: bool = True
    per_batch: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the decode paths the calibration measured (True: the fused whole stack, False: layer by layer)
    stacked_paths: list[bool] = field(default_factory=lambda: [True, False])
    #: the calibration runs: each run's measured and fitted step (ms), for the fit's own error
    runs: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = COST_SCHEMA_VERSION

    # -- prediction ----------------------------------------------------------------------------------------------
    def check_fits(self, fingerprint: str | None = None, num_layers: int | None = None, num_kv_heads: int | None = None,
                   dtype: str | None = None, machine: dict | None = None) -> None:
        """Refuse, in one line, a cost model measured for another model, dtype or machine, or not measured at all."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise AccelError(f"this cost model was measured on {self.model} ({self.fingerprint}), not on this model "
                             f"({fingerprint}); run `accel calibrate-cost --model ...` for it")
        if not self.measured:
            raise AccelError(f"the cost model for {self.model} on {self.machine.get('device', 'this device')} is a "
                             "placeholder (never measured there); run `accel calibrate-cost` on that machine")
        if machine is not None and machine.get("device", "cpu") != self.machine.get("device", "cpu"):
            raise AccelError(f"this cost model was measured on {self.machine.get('device', 'cpu')}, not on "
                             f"{machine.get('device', 'cpu')}; run `accel calibrate-cost` on this device")
        if num_layers is not None and (num_layers, num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise AccelError(f"this cost model was measured on {self.model} ({self.num_layers} layers, "
                             f"{self.num_kv_heads} KV heads), not on a model with {num_layers} layers and "
                             f"{num_kv_heads} KV heads; run `accel calibrate-cost --model ...` for it")
        if dtype is not None and dtype != self.dtype:
            raise AccelError(f"this cost model was measured in {self.dtype}, not {dtype}; run `accel calibrate-cost "
                             f"--dtype {dtype}`")
        if machine is not None and machine.get("device", "cpu") == "cpu":
            for key in ("cpu", "isa", "threads"):
                if key in self.machine and key in machine and machine[key] != self.machine[key]:
                    raise AccelError(f"this cost model was measured with {key}={self.machine[key]!r}, this process has "
                                     f"{machine[key]!r}; " + ("set the same thread count or " if key == "threads" else "")
                                     + "measure this machine's with `accel calibrate-cost --threads N --out cost.json` "
                                     "(5-12 minutes for SmolLM2-135M) and give it: accel.patch(model, 'auto', "
                                     "speed=..., cost='cost.json') or `accel plan ... --cost cost.json`")

    def batches(self) -> list[int]:
        return sorted(int(b) for b in self.per_batch)

    def coefficients(self, batch: int) -> dict[str, float]:
        """The coefficients at ``batch``: measured, or linear between the two nearest measured batch sizes; outside
        the measured range it refuses (no extrapolation)."""
        bs = self.batches()
        if not bs:
            raise AccelError("this cost model holds no measured batch size")
        if batch in bs:
            return dict(self.per_batch[str(batch)])
        if batch < bs[0] or batch > bs[-1]:
            raise AccelError(f"batch {batch} is outside the cost model's measured batch sizes {bs}; run `accel "
                             f"calibrate-cost --batches ...` including it")
        lo = max(b for b in bs if b < batch)
        hi = min(b for b in bs if b > batch)
        w = (batch - lo) / (hi - lo)
        a, c = self.per_batch[str(lo)], self.per_batch[str(hi)]
        return {k: (1 - w) * a[k] + w * c[k] for k in a}

    def predict(self, work: StepWork, batch: int) -> float:
        """Predicted decode step (ms) of a step doing ``work`` at ``batch`` rows."""
        if not self.measured:
            self.check_fits()
        if len(work.layers) != self.num_layers:
            raise AccelError(f"the step's work names {len(work.layers)} layers; the cost model's model has "
                             f"{self.num_layers}")
        if work.stacked not in self.stacked_paths:
            path = "the fused whole-stack decode" if work.stacked else "layer-by-layer decode"
            raise AccelError(f"the cost model never measured {path} on this model; re-run `accel calibrate-cost`")
        coef = self.coefficients(batch)
        f = features(work, batch, self.num_kv_heads)
        return float(sum(coef[t] * f[t] for t in TERMS))

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: Any) -> "CostModel":
        """A cost model from its JSON object; every field checked, errors in one line naming the field."""
        import math

        if not isinstance(d, dict):
            raise AccelError(f"cost model: expected a JSON object, got {type(d).__name__}")
        ver = d.get("schema_version")
        if ver != COST_SCHEMA_VERSION:
            raise AccelError(f"cost model schema_version {ver!r}: this accel reads version {COST_SCHEMA_VERSION}; "
                             "re-measure with `accel calibrate-cost`")
        fields = cls.__dataclass_fields__
        bad = set(d) - set(fields)
        if bad:
            raise AccelError(f"cost model: unknown field(s) {sorted(bad)}; valid fields are {sorted(fields)}")
        required = {"model", "model_type", "fingerprint", "num_layers", "num_kv_heads", "head_dim", "dtype", "machine"}
        missing = sorted(required - set(d))
        if missing:
            raise AccelError(f"cost model: field(s) {missing} missing; re-measure with `accel calibrate-cost`")
        for k in ("model", "model_type", "fingerprint", "dtype"):
            if not isinstance(d[k], str):
                raise AccelError(f"cost model: {k} must be a string, got {d[k]!r}")
        for k in ("num_layers", "num_kv_heads", "head_dim"):
            if isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 1:
                raise AccelError(f"cost model: {k} must be a positive integer, got {d[k]!r}")
        if not isinstance(d["machine"], dict) or not isinstance(d["machine"].get("device"), str):
            raise AccelError("cost model: machine must be an object naming its device ('cpu', 'cuda:<name>' or 'cuda')")
        if not isinstance(d.get("measured", True), bool):
            raise AccelError(f"cost model: measured must be true or false, got {d.get('measured')!r}")
        paths = d.get("stacked_paths", [True, False])
        if not isinstance(paths, list) or not paths or not all(isinstance(x, bool) for x in paths):
            raise AccelError(f"cost model: stacked_paths must be a non-empty list of true/false, got {paths!r}")
        cm = cls(**d)
        if cm.measured:
            if cm.machine["device"] == "cpu" and not all(k in cm.machine for k in ("cpu", "threads")):
                raise AccelError("cost model: a CPU cost model's machine must name its cpu and threads")
            if not isinstance(cm.per_batch, dict) or not cm.per_batch:
                raise AccelError("cost model: no measured batch size (per_batch is empty); re-measure with "
                                 "`accel calibrate-cost`")
            for b, v in cm.per_batch.items():
                if not (isinstance(b, str) and b.isdigit() and b == str(int(b)) and int(b) >= 1):
                    raise AccelError(f"cost model: per_batch key {b!r} must be a batch size such as '1' or '8'")
                if not isinstance(v, dict) or set(v) != set(TERMS) or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v.values()):
                    raise AccelError(f"cost model: per_batch[{b!r}] must map each of {list(TERMS)} to a finite number")
                neg = [t for t in TERMS if not t.endswith("_fixed") and v[t] < 0]
                if neg:
                    raise AccelError(f"cost model: per_batch[{b!r}] has negative {neg}; a time per key cannot be")
        return cm

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        p = Path(path)
        if not p.exists():
            raise AccelError(f"cost model file {str(p)!r} does not exist; make one with `accel calibrate-cost`")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise AccelError(f"cost model {str(p)!r}: not valid JSON ({exc})") from None
        return cls.from_dict(d)


#: the per-key terms held at least at ``full_slope`` by ``fit(kv_floor=True)``: a KV-compressed layer reads each row
#: it holds with the same decode kernel a full layer reads its rows with, and evicts (and accumulates) on top
KV_SLOPES = ("kv_scored_slope", "kv_plain_slope")


def fit(runs: list[dict], num_kv_heads: int, kv_floor: bool = True) -> tuple[dict[str, dict[str, float]], list[bool]]:
    """Least-squares coefficients per batch size from measured runs ``{"batch", "work": StepWork, "step_ms"}``, and the
    decode paths (stacked or not) the runs measured. Each run is weighted by 1 / its step, so the fit minimises
    relative errors (a 10 ms step matters as much as a 300 ms one); slopes, the base and ``unstacked_ms`` are held
    non-negative (scipy's bounded least squares), a kind's fixed cost is relative to a full layer's and may be
    negative. [INFER] ``kv_floor``: the compressed layers' per-key costs (``KV_SLOPES``) are held at least at a full
    layer's (fitted as ``full_slope`` plus a non-negative extra). Without it, on a machine whose read bandwidth drifts
    between runs, a free fit traded one compressed kind's slope against the other's: the free AMD EPYC calibration of
    2026-12-07 (``bench/results/cost_model_smollm2_amd_free.json``) fitted ``kv_scored_slope`` 0 and ``kv_plain_slope``
    6x ``full_slope`` at batch 1. An ``OPTIONAL`` term every run shares is left out (0). Refuses a design that does
    not determine every other term (a layer kind never measured, or never at two sizes)."""
    import numpy as np
    from scipy.optimize import lsq_linear

    per_batch = {}
    paths = sorted({bool(r["work"].stacked) for r in runs}, reverse=True)
    for b in sorted({int(r["batch"]) for r in runs}):
        rs = [r for r in runs if int(r["batch"]) == b]
        A = np.array([[features(r["work"], b, num_kv_heads)[t] for t in TERMS] for r in rs])
        y = np.array([float(r["step_ms"]) for r in rs])
        keep = [i for i, t in enumerate(TERMS) if t not in OPTIONAL or len(set(A[:, i])) > 1]
        unused = [TERMS[i] for i in keep if not np.abs(A[:, i]).sum() > 0]
        if unused:
            raise AccelError(f"cost fit: the calibration runs at batch {b} never exercise {unused}; measure those layer "
                             "kinds")
        Aw = A[:, keep] / y[:, None]
        rank = np.linalg.matrix_rank(Aw)
        if rank < len(keep):
            raise AccelError(f"cost fit: the runs at batch {b} determine only {rank} of {len(keep)} coefficients; vary "
                             "the contexts and budgets of each layer kind")
        cols = [TERMS[i] for i in keep]
        full = cols.index("full_slope")
        extras = [cols.index(t) for t in KV_SLOPES if t in cols] if kv_floor else []
        if extras:  # slope = full + extra: the full column gains the compressed kinds' keys, theirs fit the extra
            Aw[:, full] += Aw[:, extras].sum(axis=1)
        lower = np.array([-np.inf if TERMS[i].endswith("_fixed") else 0.0 for i in keep])
        coef = lsq_linear(Aw, np.ones(len(y)), bounds=(lower, np.full(len(keep), np.inf))).x
        for j in extras:
            coef[j] += coef[full]
        per_batch[str(b)] = {t: 0.0 for t in TERMS}
        per_batch[str(b)].update({TERMS[i]: float(c) for i, c in zip(keep, coef)})
    return per_batch, paths


def shipped_cost_models() -> list[CostModel]:
    """The cost models shipped inside the package (``accel/scheduler/shipped_costs/*.json``): measured ones for the
    machine the project measures on, placeholders (``measured: false``) for devices nobody has measured yet."""
    from importlib import resources

    root = resources.files("accel.scheduler") / "shipped_costs"
    if not root.is_dir():
        return []
    return [CostModel.from_dict(json.loads(f.read_text())) for f in sorted(root.iterdir(), key=lambda p: p.name)
            if f.name.endswith(".json")]


def cost_model_for(model, path: str | Path | None = None) -> CostModel:
    """The cost model that serves ``model`` in this process: the file at ``path``, or the one accel ships for this model
    on this kind of device. Refuses, in one line naming ``accel calibrate-cost``, a model, device, CPU, thread count or
    dtype it was not measured for, and a placeholder (a device nobody has measured)."""
    from ..models.registry import get_adapter
    from ..perf import machine_facts

    info = get_adapter(model).info()
    here = {**machine_facts(), "device": device_kind(model)}
    dtype = model_dtype(model)
    if path is not None:
        cm = CostModel.load(path)
    else:
        mine = [c for c in shipped_cost_models() if c.fingerprint == info.fingerprint]
        # a measured model of this exact device first, then a placeholder of its kind (cuda:<name> -> cuda)
        found = ([c for c in mine if c.machine["device"] == here["device"]]
                 or [c for c in mine if c.machine["device"] == here["device"].split(":")[0]])
        if not found:
            raise AccelError(f"accel ships no cost model for this model ({info.model_type}, {info.num_layers} layers) on "
                             f"{here['device']}; measure one (minutes): `accel calibrate-cost --model PATH --threads "
                             f"{here['threads']} --dtype {dtype} --out cost.json`, then give it: accel.patch(model, "
                             "'auto', speed=..., cost='cost.json')")
        # of several measured here, the one of this CPU, instruction set and thread count first
        found.sort(key=lambda c: [c.machine.get(k) != here.get(k) for k in ("cpu", "isa", "threads")])
        cm = found[0]
    cm.check_fits(info.fingerprint, info.num_layers, info.num_kv_heads, dtype, here)
    return cm


def device_kind(model) -> str:
    """``cpu``, or ``cuda:<device name>`` for a model on a GPU (cost models are per device kind)."""
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def model_dtype(model) -> str:
    """The model's parameter dtype as a cost model names it (``float32``, ``bfloat16``...)."""
    return str(next(model.parameters()).dtype).replace("torch.", "")
