"""The host route: one batch of a site's tensor, as a numpy array, folded into numpy accumulators.

Backends whose site tensors arrive on the host as numpy arrays (onnxruntime) use it, so that
measuring them never imports torch. The definitions are those of the PyTorch route
(`reductions.TorchReduction`): "active" is output > 0 (input > 0 for PReLU; +Inf is active, NaN
is not), NaN/Inf are counted and kept out of ranges and sums. Sums are float64 throughout, so a
NaN/Inf check per batch costs nothing extra here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import histogram

if TYPE_CHECKING:
    from .stats import SiteStats


def per_unit_sum(values: np.ndarray, unit_dim: int | None) -> np.ndarray:
    """Sum over every axis but `unit_dim`, as float64 [units] ([1] without a unit axis)."""
    if unit_dim is None:
        return np.array([values.sum(dtype=np.float64)])
    other = tuple(d for d in range(values.ndim) if d != unit_dim)
    return values.sum(axis=other, dtype=np.float64)


class NumpyReduction:
    name = "numpy"

    def update(self, stats: "SiteStats", y: Any, inp: Any, unit_dim: int | None) -> None:
        y = np.asarray(y)
        if y.dtype not in (np.float32, np.float64):
            y = y.astype(np.float32)
        finite = np.isfinite(y)
        clean = np.where(finite, y, 0.0) if not finite.all() else y  # zero is inactive under every definition
        stats.nonfinite += y.size - int(finite.sum())
        activation = stats.activation
        if activation.active_from_input and inp is not None:
            active = np.asarray(inp) > 0
        else:
            active = np.nan_to_num(y, nan=0.0, posinf=1.0, neginf=0.0) > 0
        stats.active += np.rint(per_unit_sum(active, unit_dim)).astype(np.int64)
        if stats.abs_sum is not None:
            stats.abs_sum += per_unit_sum(np.abs(clean), unit_dim)
        if activation.upper is not None:
            stats.saturated += int((clean >= activation.upper).sum())
        if finite.any():
            stats.min = np.minimum(stats.min, np.float32(y[finite].min()))
            stats.max = np.maximum(stats.max, np.float32(y[finite].max()))
        stats.sum += clean.sum(dtype=np.float64)
        stats.sumsq += np.square(clean, dtype=np.float64).sum()
        if stats.hist is not None:
            # NaN/Inf go to the +inf bucket, which percentiles leave out
            histogram.update(stats.hist, np.where(finite, y, np.inf))
