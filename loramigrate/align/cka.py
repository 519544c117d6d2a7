"""Linear CKA between every old layer and every new layer, streamed over minibatches in float64.

Two estimators, both with memory independent of the number of calibration tokens:

* ``feature``: accumulates sums, per-layer second moments and every cross-covariance; the result is
  exactly the full-data linear CKA, whatever the batch size. Memory grows with
  ``L_old · L_new · d_old · d_new``, so it suits small and mid-size pairs.
* ``minibatch``: the unbiased HSIC estimator (Song et al. 2012) averaged over fixed-size row chunks
  (Nguyen, Raghu & Kornblith 2021). Memory grows with ``(L_old + L_new) · chunk²``. Rows are
  buffered internally, so the result does not depend on the forward batch size either.
"""

from __future__ import annotations

from typing import Protocol

import torch

_EPS = 1e-30


class CKAAccumulator(Protocol):
    def update(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Add rows: ``old`` (L_old, n, d_old), ``new`` (L_new, n, d_new), the same n rows."""

    def result(self) -> torch.Tensor:
        """The (L_old, L_new) CKA matrix, on the CPU."""


class FeatureCKA:
    """Exact streaming linear CKA from accumulated (cross-)covariances."""

    def __init__(self, n_old: int, d_old: int, n_new: int, d_new: int, device: torch.device | str = "cpu") -> None:
        f64 = {"dtype": torch.float64, "device": device}  # on the activations' device
        self.n = 0
        self.sum_x = torch.zeros(n_old, d_old, **f64)
        self.sum_y = torch.zeros(n_new, d_new, **f64)
        self.xx = torch.zeros(n_old, d_old, d_old, **f64)
        self.yy = torch.zeros(n_new, d_new, d_new, **f64)
        self.xy = torch.zeros(n_old, n_new, d_old, d_new, **f64)

    def update(self, old: torch.Tensor, new: torch.Tensor) -> None:
        x, y = old.double(), new.double()
        self.n += x.shape[1]
        self.sum_x += x.sum(1)
        self.sum_y += y.sum(1)
        self.xx += x.transpose(1, 2) @ x
        self.yy += y.transpose(1, 2) @ y
        self.xy += torch.einsum("inp,jnq->ijpq", x, y)

    def result(self) -> torch.Tensor:
        n = self.n
        mx, my = self.sum_x / n, self.sum_y / n
        cxx = self.xx - n * mx[:, :, None] * mx[:, None, :]
        cyy = self.yy - n * my[:, :, None] * my[:, None, :]
        cxy = self.xy - n * torch.einsum("ip,jq->ijpq", mx, my)
        hsic_xy = cxy.pow(2).sum((-2, -1))
        norm_x = cxx.pow(2).sum((-2, -1)).sqrt()
        norm_y = cyy.pow(2).sum((-2, -1)).sqrt()
        return (hsic_xy / (norm_x[:, None] * norm_y[None, :]).clamp_min(_EPS)).cpu()


def unbiased_hsic(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC between every Gram in ``k`` (A, n, n) and every Gram in ``m`` (B, n, n).

    The diagonals must already be zero. Returns (A, B).
    """
    n = k.shape[-1]
    trace = torch.einsum("aij,bij->ab", k, m)
    sum_k, sum_m = k.sum((1, 2)), m.sum((1, 2))
    middle = sum_k[:, None] * sum_m[None, :] / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (k.sum(2) @ m.sum(2).T)
    return (trace + middle - cross) / (n * (n - 3))


def _gram(x: torch.Tensor) -> torch.Tensor:
    g = x @ x.transpose(1, 2)
    g.diagonal(dim1=1, dim2=2).zero_()
    return g


class MinibatchCKA:
    """Minibatch CKA: mean unbiased HSIC over fixed chunks of ``chunk`` rows."""

    def __init__(self, chunk: int = 512) -> None:
        if chunk < 4:
            raise ValueError("the unbiased HSIC estimator needs chunks of at least 4 rows")
        self.chunk = chunk
        self._old: list[torch.Tensor] = []
        self._new: list[torch.Tensor] = []
        self._buffered = 0
        self.hsic_xy: torch.Tensor | None = None
        self.hsic_xx: torch.Tensor | None = None
        self.hsic_yy: torch.Tensor | None = None

    def update(self, old: torch.Tensor, new: torch.Tensor) -> None:
        self._old.append(old.double())
        self._new.append(new.double())
        self._buffered += old.shape[1]
        while self._buffered >= self.chunk:
            self._flush(self.chunk)

    def _flush(self, rows: int) -> None:
        x, y = torch.cat(self._old, 1), torch.cat(self._new, 1)
        self._old, self._new = [x[:, rows:]], [y[:, rows:]]
        self._buffered -= rows
        k, m = _gram(x[:, :rows]), _gram(y[:, :rows])
        xy = unbiased_hsic(k, m)
        xx, yy = _self_hsic(k), _self_hsic(m)
        if self.hsic_xy is None:
            self.hsic_xy, self.hsic_xx, self.hsic_yy = xy, xx, yy
        else:
            self.hsic_xy += xy
            self.hsic_xx += xx
            self.hsic_yy += yy

    def result(self) -> torch.Tensor:
        if self._buffered >= 4:  # a short last chunk still carries information
            self._flush(self._buffered)
        if self.hsic_xy is None:
            raise ValueError(f"minibatch CKA needs at least 4 rows, got {self._buffered}")
        denom = (self.hsic_xx.clamp_min(_EPS)[:, None] * self.hsic_yy.clamp_min(_EPS)[None, :]).sqrt()
        return (self.hsic_xy / denom).cpu()


def _self_hsic(k: torch.Tensor) -> torch.Tensor:
    """The diagonal of ``unbiased_hsic(k, k)`` without the (A, A) cross terms."""
    n = k.shape[-1]
    trace = torch.einsum("aij,aij->a", k, k)
    s = k.sum((1, 2))
    row = k.sum(2)
    return (trace + s * s / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (row * row).sum(1)) / (n * (n - 3))


def feature_cka_bytes(n_old: int, d_old: int, n_new: int, d_new: int) -> int:
    """Memory the exact estimator needs (the cross-covariances dominate)."""
    return 8 * (n_old * n_new * d_old * d_new + n_old * d_old**2 + n_new * d_new**2)


def make_cka(
    estimator: str, n_old: int, d_old: int, n_new: int, d_new: int, chunk: int, max_bytes: int,
    device: torch.device | str = "cpu",
) -> tuple[str, CKAAccumulator]:
    """Pick and build an estimator accumulating on ``device``; ``auto`` takes the exact one when it fits in
    ``max_bytes``."""
    if estimator == "auto":
        fits = feature_cka_bytes(n_old, d_old, n_new, d_new) <= max_bytes
        estimator = "feature" if fits else "minibatch"
    if estimator == "feature":
        return estimator, FeatureCKA(n_old, d_old, n_new, d_new, device)
    if estimator == "minibatch":
        return estimator, MinibatchCKA(chunk)
    raise ValueError(f"unknown CKA estimator {estimator!r}")
