"""Streaming, mergeable statistics that live on the measuring device: per site, and per site's gradient.

The states are declared once (`accumulators.State`); merging shards, all-reducing ranks and
reading back come from that table. `update` never reads a value back to the host on an
accelerator; `to_host` is the one device-to-host transfer. How a batch is reduced is the
route object's business (`reductions.TorchReduction`, or a backend's faster one).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from . import histogram
from .accumulators import Accumulators, State, arrays_for
from .policy import NonfinitePolicy
from .sites import Activation

INF = float("inf")


def default_reduction(device: Any) -> Any:
    """The plain route for `device`: PyTorch reductions (NaN/Inf policy for that device), or numpy
    on the host (device None)."""
    if device is None:
        from .numpy_reduction import NumpyReduction

        return NumpyReduction()
    from .reductions import TorchReduction

    return TorchReduction(NonfinitePolicy.for_device(device))


class SiteStats(Accumulators):
    """Accumulators for one activation site."""

    STATES: ClassVar[tuple[State, ...]] = (
        State("active", "int64", "sum", "units"),  # elements in the active region
        State("abs_sum", "float64", "sum", "units",  # |y| sums, for the dormant score
              kept=lambda stats: stats.activation.has_dormant_score),
        State("saturated", "int64", "sum"),  # outputs at the upper bound
        State("nonfinite", "int64", "sum"),  # NaN/Inf outputs
        State("min", "float32", "min", initial=INF),  # over finite outputs
        State("max", "float32", "max", initial=-INF),
        State("sum", "float64", "sum"),  # over finite outputs
        State("sumsq", "float64", "sum"),
        State("hist", "int64", "sum", "buckets", kept=lambda stats: stats.percentiles),  # see histogram.py
        State("poisoned", "bool", "any"),  # a deferred batch held NaN/Inf (NonfinitePolicy.DEFER)
    )
    COUNTERS: ClassVar[tuple[str, ...]] = ("elements", "samples")

    def __init__(self, activation: Activation, shape: tuple[int, ...], unit_axis: int, device: Any, *,
                 percentiles: bool = False, reduction: Any = None) -> None:
        """`device`: where torch tensors are measured; None for numpy arrays on the host."""
        self.activation = activation
        self.shape = tuple(shape)  # per sample (batch axis dropped)
        self.unit_axis = unit_axis  # index into `shape`
        self.percentiles = percentiles
        # The route each batch takes: chosen once per run and shared by every site
        self.reduction = reduction if reduction is not None else default_reduction(device)
        self._create_states(arrays_for(device), self.units)

    @property
    def device(self) -> Any:
        return self.arrays.device

    def buckets(self) -> int:
        return histogram.bucket_count(signed=not self.activation.hard_zero)

    @property
    def units(self) -> int:
        return self.shape[self.unit_axis] if self.shape else 1

    def update(self, output: Any, inp: Any = None, samples: int | None = None) -> None:
        """Fold one batch of a site's output (batch axis first) into the accumulators.

        `inp` is the activation's input, used only where the definition of "active" needs it
        (PReLU). The tensor is reduced here and not kept: in-place activations hand us an
        object that later ops will overwrite. `samples` is how many samples the batch counts
        as where its leading axis is not the sample axis: a token site's real tokens, gathered
        from [batch, seq] positions by an attention mask, are `samples` sequences.
        """
        y = output.detach() if hasattr(output, "detach") else output  # a torch tensor, or a numpy array
        if y.ndim == 0:
            y = y.reshape(1)
        if samples is not None:
            self.samples += samples
        else:
            self.samples += y.shape[0] if y.ndim > len(self.shape) else 1
        self.elements += math.prod(y.shape)
        unit_dim = self.unit_axis + (y.ndim - len(self.shape)) if self.shape else None
        self.reduction.update(self, y, inp, unit_dim)

    def merge(self, other: Accumulators) -> None:
        if not isinstance(other, SiteStats) or other.shape != self.shape or other.unit_axis != self.unit_axis:
            raise ValueError("cannot merge statistics of differently shaped sites")
        super().merge(other)

    def to_host(self) -> dict[str, Any]:
        host = super().to_host()
        hist = host.pop("hist")
        host["percentiles"] = None if hist is None else histogram.percentiles(hist, signed=not self.activation.hard_zero)
        return host


class SiteGradStats(Accumulators):
    """RMS and exact-zero share of the gradient with respect to one site's output."""

    STATES: ClassVar[tuple[State, ...]] = (
        State("sumsq", "float64", "sum"),
        State("zeros", "int64", "sum"),
    )
    COUNTERS: ClassVar[tuple[str, ...]] = ("count",)

    def __init__(self, device: Any) -> None:
        self._create_states(arrays_for(device))

    @classmethod
    def on(cls, device: Any) -> "SiteGradStats":
        return cls(device)

    def update(self, grad: Any) -> None:
        if grad is None:  # no gradient reached this output from outside (TorchScript's extra outputs)
            return
        torch = self.arrays.torch
        with torch.no_grad():
            g = grad.detach()
            self.sumsq += torch.linalg.vector_norm(g.float()).double() ** 2
            self.zeros += (g == 0).sum()
        self.count += g.numel()

    def to_dict(self) -> dict[str, Any]:
        host = self.to_host()
        if not host["count"]:
            return {"rms": None, "zero_fraction": None}
        rms = math.sqrt(host["sumsq"] / host["count"])
        return {"rms": rms if math.isfinite(rms) else None, "zero_fraction": host["zeros"] / host["count"]}
