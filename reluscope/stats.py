"""Streaming, mergeable per-site statistics that live on the model's device.

Each state has one merge operator (sum, min or max), as torchmetrics' `Metric` does, so the
same merge serves batches, shards and torch.distributed. Means are kept as (sum, count),
never as averages of averages. `update` never reads a value back to the host on an
accelerator (DESIGN rule 1); `to_host` is the one device-to-host transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import histogram
from .sites import Activation


@dataclass
class SiteStats:
    """Accumulators for one activation site."""

    activation: Activation
    shape: tuple[int, ...]  # per sample (batch axis dropped)
    unit_axis: int  # index into `shape`
    device: torch.device
    percentiles: bool = False  # keep a streaming histogram (see histogram.py)
    elements: int = 0  # host-side: shapes are metadata, counting them costs no sync
    samples: int = 0
    active: torch.Tensor = field(init=False)  # int64 [units]: elements in the active region
    abs_sum: torch.Tensor | None = field(init=False)  # float64 [units]: for the dormant score
    saturated: torch.Tensor = field(init=False)  # int64 scalar: outputs at the upper bound
    nonfinite: torch.Tensor = field(init=False)  # int64 scalar: NaN/Inf outputs
    vmin: torch.Tensor = field(init=False)  # min over finite outputs
    vmax: torch.Tensor = field(init=False)
    vsum: torch.Tensor = field(init=False)  # float64 sum over finite outputs
    vsumsq: torch.Tensor = field(init=False)
    hist: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        units = self.units
        dev = self.device
        self.active = torch.zeros(units, dtype=torch.int64, device=dev)
        self.abs_sum = torch.zeros(units, dtype=torch.float64, device=dev) if self.activation.has_dormant_score else None
        self.saturated = torch.zeros((), dtype=torch.int64, device=dev)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self.vmin = torch.full((), float("inf"), dtype=torch.float32, device=dev)
        self.vmax = torch.full((), float("-inf"), dtype=torch.float32, device=dev)
        self.vsum = torch.zeros((), dtype=torch.float64, device=dev)
        self.vsumsq = torch.zeros((), dtype=torch.float64, device=dev)
        self.hist = histogram.empty(not self.activation.hard_zero, dev) if self.percentiles else None

    @property
    def units(self) -> int:
        return self.shape[self.unit_axis] if self.shape else 1

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, output: torch.Tensor, inp: torch.Tensor | None = None) -> None:
        """Fold one batch of a site's output (batch axis first) into the accumulators.

        `inp` is the activation's input, used only where the definition of "active" needs it
        (PReLU). The tensor is reduced here and not kept: in-place activations hand us an
        object that later ops will overwrite.
        """
        y = output.detach()
        if y.dtype not in (torch.float32, torch.float64):
            y = y.float()
        if y.dim() == 0:
            y = y.reshape(1)
        batch = y.shape[0] if y.dim() > len(self.shape) else 1
        self.samples += batch
        self.elements += y.numel()
        if self.shape:
            unit_dim = self.unit_axis + (y.dim() - len(self.shape))
            other_dims = tuple(d for d in range(y.dim()) if d != unit_dim)
        else:  # one scalar per sample: a single unit
            other_dims = tuple(range(y.dim()))

        if self.activation.active_from_input and inp is not None:
            self.active += (inp.detach() > 0).sum(dim=other_dims)
        elif self.activation.hard_zero:
            # Outputs are >= 0, so "active" (> 0) is "non-zero": one pass, no mask tensor.
            self.active += torch.count_nonzero(y, dim=other_dims)
        else:
            self.active += (y > 0).sum(dim=other_dims)
        if self.abs_sum is not None:
            self.abs_sum += y.abs().sum(dim=other_dims, dtype=torch.float64)
        if self.activation.upper is not None:
            self.saturated += (y >= self.activation.upper).sum()

        bmin, bmax = torch.aminmax(y)
        bsum = y.sum()
        bsumsq = torch.linalg.vector_norm(y).double() ** 2
        finite = torch.isfinite(bmin) & torch.isfinite(bmax) & torch.isfinite(bsumsq)
        # On the CPU a host branch is free, so the masked fallback runs only for batches that
        # hold NaN/Inf. On an accelerator it always runs, to keep the update free of syncs.
        if y.device.type != "cpu" or not bool(finite):
            ok = torch.isfinite(y)
            bad = y.numel() - ok.sum()
            masked_min = torch.where(ok, y, torch.inf).amin()
            masked_max = torch.where(ok, y, -torch.inf).amax()
            masked_sum = torch.where(ok, y, 0).sum()
            masked_sumsq = torch.where(ok, y, 0).double().pow(2).sum()
            bmin = torch.where(finite, bmin, masked_min)
            bmax = torch.where(finite, bmax, masked_max)
            bsum = torch.where(finite, bsum, masked_sum)
            bsumsq = torch.where(finite, bsumsq, masked_sumsq)
            self.nonfinite += torch.where(finite, 0, bad)
        self.vmin = torch.minimum(self.vmin, bmin.float())
        self.vmax = torch.maximum(self.vmax, bmax.float())
        self.vsum += bsum.double()
        self.vsumsq += bsumsq
        if self.hist is not None:
            histogram.update(self.hist, y)

    # ------------------------------------------------------------------- merge
    def merge(self, other: "SiteStats") -> None:
        """Fold another accumulator of the same site (another shard or process) into this one."""
        if other.shape != self.shape or other.unit_axis != self.unit_axis:
            raise ValueError("cannot merge statistics of differently shaped sites")
        self.elements += other.elements
        self.samples += other.samples
        self.active += other.active.to(self.device)
        if self.abs_sum is not None and other.abs_sum is not None:
            self.abs_sum += other.abs_sum.to(self.device)
        self.saturated += other.saturated.to(self.device)
        self.nonfinite += other.nonfinite.to(self.device)
        self.vmin = torch.minimum(self.vmin, other.vmin.to(self.device))
        self.vmax = torch.maximum(self.vmax, other.vmax.to(self.device))
        self.vsum += other.vsum.to(self.device)
        self.vsumsq += other.vsumsq.to(self.device)
        if self.hist is not None and other.hist is not None:
            self.hist += other.hist.to(self.device)

    def all_reduce(self) -> None:
        """Merge this site's accumulators across torch.distributed ranks (same merge operators)."""
        from .distributed import all_reduce, all_reduce_int

        for tensor in (self.active, self.saturated, self.nonfinite, self.vsum, self.vsumsq):
            all_reduce(tensor, "sum")
        for optional in (self.abs_sum, self.hist):
            if optional is not None:
                all_reduce(optional, "sum")
        all_reduce(self.vmin, "min")
        all_reduce(self.vmax, "max")
        self.elements = all_reduce_int(self.elements, self.device)
        self.samples = all_reduce_int(self.samples, self.device)

    # ----------------------------------------------------------------- readout
    def to_host(self) -> dict[str, Any]:
        """Read every accumulator back once (the single device-to-host transfer)."""
        return {
            "elements": self.elements,
            "samples": self.samples,
            "active": self.active.cpu().tolist(),
            "abs_sum": None if self.abs_sum is None else self.abs_sum.cpu().tolist(),
            "saturated": int(self.saturated.item()),
            "nonfinite": int(self.nonfinite.item()),
            "min": float(self.vmin.item()),
            "max": float(self.vmax.item()),
            "sum": float(self.vsum.item()),
            "sumsq": float(self.vsumsq.item()),
            "percentiles": None if self.hist is None else
            histogram.percentiles(self.hist.cpu().tolist(), signed=not self.activation.hard_zero),
        }
