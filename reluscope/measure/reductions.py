"""How one batch of a site's tensor is folded into its accumulators with PyTorch reductions.

A reduction route is an object chosen once per run (by the backend: device, data source, the
user's `--stats-kernel`) and handed to every site; nothing on the hot path re-decides it. This
module holds the PyTorch route, which runs everywhere; the backend may wrap it in a faster one
(the torch backend's one-pass Triton kernel on CUDA) that falls back to it where it does not apply.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from . import histogram
from .policy import NonfinitePolicy

if TYPE_CHECKING:
    from .stats import SiteStats

# Elements per chunk of the CPU route's elementwise temporaries (4 MB of float32): small enough
# to stay in cache, large enough that the per-chunk Python cost is noise.
CHUNK_ELEMENTS = 1 << 20
# Activations above this many elements go through the chunk buffer; smaller ones stay in cache anyway.
CHUNKED_ABOVE = 4 * CHUNK_ELEMENTS

Transform = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def per_unit_sum(values: torch.Tensor, unit_dim: int | None) -> torch.Tensor:
    """Sum over every axis but `unit_dim`, as float64 [units].

    Reducing several non-adjacent axes at once is slow on the CPU; a contiguous tensor is
    viewed as (outer, units, inner) and reduced along the contiguous inner axis first.
    Float32 partial sums of 0/1 values stay exact below 2**24 elements per row.
    """
    if unit_dim is None:
        return values.sum(dtype=torch.float64).reshape(1)
    grouped = grouped_view(values, unit_dim)
    if grouped is not None:
        return _sum_grouped(grouped)
    other = tuple(d for d in range(values.dim()) if d != unit_dim)
    return values.sum(dim=other, dtype=torch.float64)


def _sum_grouped(grouped: torch.Tensor) -> torch.Tensor:
    """Per-unit float64 sums of an (outer, units, inner) view, the contiguous inner axis first."""
    return (grouped[:, :, 0] if grouped.shape[2] == 1 else grouped.sum(2)).sum(0, dtype=torch.float64)


def grouped_view(values: torch.Tensor, unit_dim: int | None) -> torch.Tensor | None:
    """`values` as a contiguous (outer, units, inner) view, or None for other layouts."""
    if unit_dim is None:
        return values.view(-1, 1, 1) if values.is_contiguous() else None
    units = values.shape[unit_dim]
    if values.is_contiguous():
        return values.view(math.prod(values.shape[:unit_dim]), units, -1)
    moved = values.movedim(unit_dim, -1)  # channels_last tensors are contiguous this way round
    return moved.view(-1, units, 1) if moved.is_contiguous() else None


class ChunkBuffers:
    """Small reused buffers for elementwise temporaries of large CPU activations, one per dtype.

    A whole activation-sized temporary is fresh memory from the OS each time (page faults) and a
    round trip through DRAM; rows of the (outer, units, inner) view go through one buffer instead.
    Owned by one run's reduction route, so they are freed when the run ends.
    """

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS, chunked_above: int = CHUNKED_ABOVE) -> None:
        self.chunk_elements = chunk_elements
        self.chunked_above = chunked_above
        self.by_dtype: dict[torch.dtype, torch.Tensor] = {}

    def per_unit_sum_of(self, values: torch.Tensor, unit_dim: int | None, transform: Transform) -> torch.Tensor:
        """per_unit_sum(transform(values)), where `transform(x, out)` is elementwise (sign, abs)."""
        large = values.device.type == "cpu" and values.numel() > self.chunked_above
        grouped = grouped_view(values, unit_dim) if large else None
        if grouped is None:
            return per_unit_sum(transform(values, None), unit_dim)
        outer, units, inner = grouped.shape
        rows = max(1, self.chunk_elements // (units * inner))
        needed = min(rows, outer) * units * inner
        buffer = self.by_dtype.get(values.dtype)
        if buffer is None or buffer.numel() < needed:
            buffer = self.by_dtype[values.dtype] = torch.empty(needed, dtype=values.dtype)
        total = torch.zeros(units, dtype=torch.float64)
        for start in range(0, outer, rows):
            part = grouped[start:start + rows]
            total += _sum_grouped(transform(part, buffer[: part.numel()].view(part.shape)))
        return total


def sign(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.sign(x, out=out)


def positive_sign(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.sign(x, out=out).clamp_(min=0)  # smooth activations: negative outputs are not active


def absolute(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.abs(x, out=out)


class TorchReduction:
    """The PyTorch route: a handful of reductions, each a pass over the tensor."""

    name = "torch"

    def __init__(self, nonfinite: NonfinitePolicy = NonfinitePolicy.CHECK,
                 buffers: ChunkBuffers | None = None) -> None:
        self.nonfinite = nonfinite
        self.buffers = buffers or ChunkBuffers()

    def with_policy(self, nonfinite: NonfinitePolicy) -> "TorchReduction":
        return TorchReduction(nonfinite, self.buffers)

    @torch.no_grad()
    def update(self, stats: "SiteStats", y: torch.Tensor, inp: torch.Tensor | None, unit_dim: int | None) -> None:
        if y.dtype not in (torch.float32, torch.float64):
            y = y.float()
        bmin, bmax = torch.aminmax(y)
        bsumsq = torch.linalg.vector_norm(y).double() ** 2
        clean = y
        counted = y  # what "active" is read from: +Inf is > 0 and active, NaN is not
        if self.nonfinite is NonfinitePolicy.DEFER:
            stats.poisoned |= ~torch.isfinite(bsumsq)
        elif self.nonfinite is NonfinitePolicy.MASKED or not bool(torch.isfinite(bsumsq)):
            # Also taken when finite outputs above ~1e19 overflow the float32 sum of squares:
            # this path sums in float64.
            ok = torch.isfinite(y)
            stats.nonfinite += y.numel() - ok.sum()
            clean = torch.where(ok, y, 0.0).double()  # zero is inactive under every definition
            counted = torch.nan_to_num(y, nan=0.0, posinf=1.0, neginf=0.0)
            bmin = torch.where(ok, y, torch.inf).amin()
            bmax = torch.where(ok, y, -torch.inf).amax()
            bsumsq = torch.linalg.vector_norm(clean) ** 2

        activation = stats.activation
        if activation.active_from_input and inp is not None:
            active = per_unit_sum((inp.detach() > 0).to(clean.dtype), unit_dim)
        else:
            # sign() is 1 for active outputs and 0 for zeros: a counting pass that vectorizes
            # far better than count_nonzero over several axes.
            active = self.buffers.per_unit_sum_of(counted, unit_dim, sign if activation.hard_zero else positive_sign)
        stats.active += active.round().long()
        if stats.abs_sum is not None:
            stats.abs_sum += self.buffers.per_unit_sum_of(clean, unit_dim, absolute)
        if activation.upper is not None:
            stats.saturated += (clean >= activation.upper).sum()
        stats.min = torch.minimum(stats.min, bmin.float())
        stats.max = torch.maximum(stats.max, bmax.float())
        stats.sum += clean.sum().double()
        stats.sumsq += bsumsq
        if stats.hist is not None:
            # NaN/Inf go to the +inf bucket, which percentiles leave out
            histogram.update(stats.hist, y if clean is y else torch.where(torch.isfinite(y), y, torch.inf))
