"""Streaming, mergeable per-site statistics that live on the model's device.

Each state has one merge operator (sum, min or max), as torchmetrics' `Metric` does, so the
same merge serves batches, shards and torch.distributed. Means are kept as (sum, count),
never as averages of averages. `update` never reads a value back to the host on an
accelerator (DESIGN rule 1); `to_host` is the one device-to-host transfer.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import histogram
from .sites import Activation


def per_unit_sum(values: torch.Tensor, unit_dim: int | None) -> torch.Tensor:
    """Sum over every axis but `unit_dim`, as float64 [units].

    Reducing several non-adjacent axes at once is slow on the CPU; a contiguous tensor is
    viewed as (outer, units, inner) and reduced along the contiguous inner axis first.
    Float32 partial sums of 0/1 values stay exact below 2**24 elements per row.
    """
    if unit_dim is None:
        return values.sum(dtype=torch.float64).reshape(1)
    grouped = _grouped(values, unit_dim)
    if grouped is not None:
        return _sum_grouped(grouped)
    other = tuple(d for d in range(values.dim()) if d != unit_dim)
    return values.sum(dim=other, dtype=torch.float64)


def _sum_grouped(grouped: torch.Tensor) -> torch.Tensor:
    """Per-unit float64 sums of an (outer, units, inner) view, the contiguous inner axis first."""
    return (grouped[:, :, 0] if grouped.shape[2] == 1 else grouped.sum(2)).sum(0, dtype=torch.float64)


# Elements per chunk of the CPU route's elementwise temporaries (4 MB of float32): small enough
# to stay in cache, large enough that the per-chunk Python cost is noise.
CHUNK_ELEMENTS = 1 << 20
_chunk_buffers = threading.local()


def per_unit_sum_of(values: torch.Tensor, unit_dim: int | None,
                    transform: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """per_unit_sum(transform(values)), where `transform(x, out)` is elementwise (sign, abs).

    On the CPU the transformed tensor is never materialised whole: rows of the (outer, units,
    inner) view go through one small, reused buffer. A whole activation-sized temporary is fresh
    memory from the OS each time (page faults) and a round trip through DRAM; measured here on
    ResNet activations at batch 16, sign() plus the per-unit sum took 19 ms whole and 3 ms in
    chunks."""
    large = values.device.type == "cpu" and values.numel() > 4 * CHUNK_ELEMENTS  # smaller ones stay in cache
    grouped = _grouped(values, unit_dim) if large else None
    if grouped is None:
        return per_unit_sum(transform(values, None), unit_dim)
    outer, units, inner = grouped.shape
    rows = max(1, CHUNK_ELEMENTS // (units * inner))
    buffers = _chunk_buffers.__dict__.setdefault("by_dtype", {})
    needed = min(rows, outer) * units * inner
    buffer = buffers.get(values.dtype)
    if buffer is None or buffer.numel() < needed:
        buffer = buffers[values.dtype] = torch.empty(needed, dtype=values.dtype)
    total = torch.zeros(units, dtype=torch.float64)
    for start in range(0, outer, rows):
        part = grouped[start:start + rows]
        total += _sum_grouped(transform(part, buffer[: part.numel()].view(part.shape)))
    return total


def release_chunk_buffers() -> None:
    """Free this thread's chunk buffers (at the end of an analysis)."""
    _chunk_buffers.__dict__.pop("by_dtype", None)


def _grouped(values: torch.Tensor, unit_dim: int | None) -> torch.Tensor | None:
    """`values` as a contiguous (outer, units, inner) view, or None for other layouts."""
    if unit_dim is None:
        return values.view(-1, 1, 1) if values.is_contiguous() else None
    units = values.shape[unit_dim]
    if values.is_contiguous():
        return values.view(math.prod(values.shape[:unit_dim]), units, -1)
    moved = values.movedim(unit_dim, -1)  # channels_last tensors are contiguous this way round
    return moved.view(-1, units, 1) if moved.is_contiguous() else None


@functools.cache
def _import_fused() -> tuple[Any, str | None]:
    try:
        from ..backends.torch import triton_kernel as triton_stats
    except ImportError:
        return None, "the triton package is not installed"
    except Exception as exc:  # noqa: BLE001 - a broken triton install raises more than ImportError
        return None, f"the triton package failed to import ({type(exc).__name__}: {str(exc).strip()[:160]})"
    return triton_stats, None


def fused_module() -> Any:
    """reluscope.triton_stats, or None where triton is missing or broken (CPU-only setups)."""
    return _import_fused()[0]


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The route `kernel` takes on `device`: "triton" or "torch". Raises ValueError for a
    Triton request that cannot be met."""
    if kernel == "torch" or kernel == "auto" and torch.device(device).type != "cuda":
        return "torch"  # without importing triton (a second of start-up) where it cannot be used
    fused, import_error = _import_fused()
    usable = fused is not None and fused.usable_on(device)
    if kernel == "triton" and not usable:
        why = import_error or f"it needs a CUDA device, not {device}"
        raise ValueError(f"the Triton statistics kernel cannot run here: {why}")
    return "triton" if usable else "torch"


def _sign(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.sign(x, out=out)


def _positive_sign(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.sign(x, out=out).clamp_(min=0)  # smooth activations: negative outputs are not active


def _abs(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.abs(x, out=out)


def defers_nonfinite(device: torch.device) -> bool:
    """Whether NaN/Inf handling waits for the end of the run: where a host sync is not free."""
    return torch.device(device).type != "cpu"


@dataclass
class SiteStats:
    """Accumulators for one activation site."""

    activation: Activation
    shape: tuple[int, ...]  # per sample (batch axis dropped)
    unit_axis: int  # index into `shape`
    device: torch.device
    percentiles: bool = False  # keep a streaming histogram (see histogram.py)
    masked: bool = False  # always take the NaN/Inf-safe path
    kernel: str = "auto"  # auto: the Triton kernel on CUDA where triton is installed; triton; torch
    defer_nonfinite: bool | None = None  # None: on accelerators (see update)
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
    poisoned: torch.Tensor = field(init=False)  # bool scalar: a deferred batch held NaN/Inf

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
        self.poisoned = torch.zeros((), dtype=torch.bool, device=dev)
        if self.defer_nonfinite is None:
            self.defer_nonfinite = defers_nonfinite(dev)

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
        if y.dim() == 0:
            y = y.reshape(1)
        self.samples += y.shape[0] if y.dim() > len(self.shape) else 1
        self.elements += y.numel()
        unit_dim = self.unit_axis + (y.dim() - len(self.shape)) if self.shape else None
        fused = self._fused_kernel(inp) if self.kernel != "torch" else None
        if fused is not None and fused.accumulate(self, y, unit_dim):
            if self.hist is not None:  # NaN/Inf go to the +inf bucket, which percentiles leave out
                values = y.float()
                histogram.update(self.hist, torch.where(torch.isfinite(values), values, torch.inf))
            return
        if y.dtype not in (torch.float32, torch.float64):
            y = y.float()
        self._update_torch(y, inp, unit_dim)

    def _fused_kernel(self, inp: torch.Tensor | None) -> Any:
        """The one-pass Triton module where this site may use it, else None (PyTorch route)."""
        if self.activation.active_from_input and inp is not None:
            return None  # "active" reads the input: a second tensor the kernel does not take
        if self.kernel == "auto" and torch.device(self.device).type != "cuda":
            return None
        return fused_module()

    def _update_torch(self, y: torch.Tensor, inp: torch.Tensor | None, unit_dim: int | None) -> None:
        """The plain PyTorch route: a handful of reductions, each a pass over `y`."""
        bmin, bmax = torch.aminmax(y)
        bsumsq = torch.linalg.vector_norm(y).double() ** 2
        clean = y
        # NaN/Inf poison every reduction, and any of them makes the sum of squares non-finite.
        # Where a host branch is free (the CPU) the masked path runs for the batches that hold
        # them. On an accelerator that branch would be a sync per site and batch, so the fast
        # path runs and a device-side flag remembers the poison; the analysis reads the flags
        # once at the end and, if any is set, measures again in `masked` mode (see api.py).
        if self.defer_nonfinite and not self.masked:
            self.poisoned |= ~torch.isfinite(bsumsq)
        elif self.masked or not bool(torch.isfinite(bsumsq)):
            # Also taken when finite outputs above ~1e19 overflow the float32 sum of squares:
            # this path sums in float64.
            ok = torch.isfinite(y)
            self.nonfinite += y.numel() - ok.sum()
            clean = torch.where(ok, y, 0.0).double()  # zero is inactive under every definition
            bmin = torch.where(ok, y, torch.inf).amin()
            bmax = torch.where(ok, y, -torch.inf).amax()
            bsumsq = torch.linalg.vector_norm(clean) ** 2

        if self.activation.active_from_input and inp is not None:
            active = per_unit_sum((inp.detach() > 0).to(clean.dtype), unit_dim)
        else:
            # sign() is 1 for active outputs and 0 for zeros: a counting pass that vectorizes
            # far better than count_nonzero over several axes. Negative outputs (smooth
            # activations) are clipped to 0.
            active = per_unit_sum_of(clean, unit_dim, _sign if self.activation.hard_zero else _positive_sign)
        self.active += active.round().long()
        if self.abs_sum is not None:
            self.abs_sum += per_unit_sum_of(clean, unit_dim, _abs)
        if self.activation.upper is not None:
            self.saturated += (clean >= self.activation.upper).sum()
        self.vmin = torch.minimum(self.vmin, bmin.float())
        self.vmax = torch.maximum(self.vmax, bmax.float())
        self.vsum += clean.sum().double()
        self.vsumsq += bsumsq
        if self.hist is not None:
            # NaN/Inf go to the +inf bucket, which percentiles leave out
            histogram.update(self.hist, y if clean is y else torch.where(torch.isfinite(y), y, torch.inf))

    @torch.no_grad()
    def add_reduced(self, *, samples: int, elements: int, active: torch.Tensor, total: float, squares: float,
                    low: float, high: float, abs_sum: torch.Tensor | None = None, saturated: int = 0) -> None:
        """Fold a batch that a backend already reduced (per-unit active counts and |y| sums, sums,
        extremes over finite values), e.g. inside an ONNX graph. Same merge operators as `update`."""
        self.samples += samples
        self.elements += elements
        self.active += active.to(self.device, torch.int64)
        if self.abs_sum is not None and abs_sum is not None:
            self.abs_sum += abs_sum.to(self.device, torch.float64)
        self.saturated += saturated
        self.vmin.clamp_(max=low)
        self.vmax.clamp_(min=high)
        self.vsum += total
        self.vsumsq += squares

    # ------------------------------------------------------------------- merge
    def merge(self, other: "SiteStats") -> None:
        """Fold another accumulator of the same site (another shard or process) into this one."""
        if other.shape != self.shape or other.unit_axis != self.unit_axis:
            raise ValueError("cannot merge statistics of differently shaped sites")
        self.poisoned |= other.poisoned.to(self.device)
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
        from ..distributed import all_reduce, all_reduce_int

        for tensor in (self.active, self.saturated, self.nonfinite, self.vsum, self.vsumsq):
            all_reduce(tensor, "sum")
        poisoned = self.poisoned.to(torch.int32)
        self.poisoned = all_reduce(poisoned, "max").bool()
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


@dataclass
class SiteGradStats:
    """RMS and exact-zero share of the gradient with respect to one site's output."""

    sumsq: torch.Tensor
    zeros: torch.Tensor
    count: int = 0

    @classmethod
    def on(cls, device: torch.device) -> "SiteGradStats":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, grad: torch.Tensor | None) -> None:
        if grad is None:  # no gradient reached this output from outside (TorchScript's extra outputs)
            return
        g = grad.detach()
        self.sumsq += torch.linalg.vector_norm(g.float()).double() ** 2
        self.zeros += (g == 0).sum()
        self.count += g.numel()

    def all_reduce(self) -> None:
        from ..distributed import all_reduce, all_reduce_int

        all_reduce(self.sumsq, "sum")
        all_reduce(self.zeros, "sum")
        self.count = all_reduce_int(self.count, self.sumsq.device)

    def to_dict(self) -> dict[str, Any]:
        if not self.count:
            return {"rms": None, "zero_fraction": None}
        rms = math.sqrt(float(self.sumsq.item()) / self.count)
        return {"rms": rms if math.isfinite(rms) else None, "zero_fraction": int(self.zeros.item()) / self.count}
