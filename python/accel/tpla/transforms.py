"""Orthogonal transforms of the MLA latent before it is sliced into TPLA shards (methods.md 3.3).

For any orthogonal ``U`` the rotated model is exactly the original: the latent is stored as ``U n`` (``n`` the
RMS-normalised latent without its gain) and the up-projections become ``W_UK diag(gamma) U^T`` and
``W_UV diag(gamma) U^T``; ``rms(U x) = rms(x)`` because ``U`` preserves the norm, so the gain-free RMSNorm
commutes with the rotation. What the transform changes is how the latent's energy is spread over the
channels each shard holds.

* ``identity``: channels in their original order, shard ``r`` holds channels ``[r*dc/g, (r+1)*dc/g)``.
* ``hadamard``: the normalised Sylvester-Hadamard matrix (``dc`` a power of two), spreading every
  direction's energy evenly over all channels, so every shard sees a statistically similar share of each
  logit [SRC-paper: Hadamard or PCA].
* ``pca``: eigenvectors of the calibration covariance of the gain-free latent ``E[n n^T]`` (per layer),
  strongest first; ``assignment="contiguous"`` (default) gives shard 0 the strongest block, so one shard sees
  nearly the whole logit of a low-rank latent; ``"interleaved"`` deals components round-robin so each shard
  gets a similar share of the variance [INFER: the paper does not say which; both are offered. Contiguous is
  the default because it erred least in our error table (``bench/bench_tpla.py error``): e.g. 0.40 vs 0.62
  relative error at g=2 with random queries, 0.39 vs 0.42 with aligned ones].

A transform is returned as one matrix whose rows are already ordered so that shard ``r`` is the contiguous
slice ``r`` of the rotated latent.
"""
from __future__ import annotations

import torch

from ..errors import AccelError

TRANSFORMS = ("identity", "hadamard", "pca")
ASSIGNMENTS = ("interleaved", "contiguous")


def hadamard(d: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size ``d`` (a power of two)."""
    if d < 1 or d & (d - 1):
        raise AccelError(f"tpla: transform='hadamard' needs the latent width (kv_lora_rank) to be a power of two, got {d}; "
                         "use transform='pca' or 'identity'")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d ** 0.5


def pca_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows = eigenvectors of the symmetric ``cov``, by decreasing eigenvalue; and the eigenvalues."""
    cov = 0.5 * (cov.double() + cov.double().T)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order].T.contiguous(), evals[order]


def shard_order(d: int, shards: int, assignment: str) -> torch.Tensor:
    """Component order such that shard ``r`` is the contiguous slice ``r``: interleaved deals components
    ``r, r+g, r+2g, ...`` to shard ``r``; contiguous keeps the order."""
    if assignment not in ASSIGNMENTS:
        raise AccelError(f"tpla: assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    if assignment == "contiguous":
        return torch.arange(d)
    return torch.cat([torch.arange(r, d, shards) for r in range(shards)])


def build_transform(kind: str, d: int, shards: int, cov: torch.Tensor | None = None,
                    assignment: str = "contiguous") -> torch.Tensor | None:
    """The ``[d, d]`` orthogonal matrix (float64) for ``kind``; None for ``identity``."""
    if kind == "identity":
        return None
    if kind == "hadamard":
        return hadamard(d)
    if kind == "pca":
        if cov is None:
            raise AccelError("tpla: transform='pca' needs calibration statistics: pass calibration=<token ids> (or a "
                             "PCA file from accel.tpla.calibrate_pca) to accel.patch")
        if tuple(cov.shape) != (d, d):
            raise AccelError(f"tpla: PCA covariance has shape {tuple(cov.shape)}, expected ({d}, {d}) for this layer")
        basis, _ = pca_basis(cov)
        return basis[shard_order(d, shards, assignment)]
    raise AccelError(f"tpla: unknown transform {kind!r}; choose one of {TRANSFORMS}")
