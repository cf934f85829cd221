"""Which reduction route a torch run takes, chosen once per run: the PyTorch reductions, or the
one-pass Triton kernel on CUDA with the PyTorch route as its fallback."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from ...errors import UsageError
from ...measure import histogram
from ...measure.reductions import NonfinitePolicy, TorchReduction

if TYPE_CHECKING:
    from ...measure.stats import SiteStats

@functools.cache
def _import_kernel() -> tuple[Any, str | None]:
    try:
        from . import triton_kernel
    except ImportError:
        return None, "the triton package is not installed"
    except Exception as exc:  # noqa: BLE001 - a broken triton install raises more than ImportError
        return None, f"the triton package failed to import ({type(exc).__name__}: {str(exc).strip()[:160]})"
    return triton_kernel, None


class TritonReduction:
    """One kernel launch per site and batch; sites and tensors the kernel does not take (PReLU,
    whose "active" reads a second tensor; float64; other layouts) go to `fallback`."""

    name = "triton"

    def __init__(self, kernel: Any, fallback: TorchReduction) -> None:
        self.kernel = kernel
        self.fallback = fallback

    @property
    def nonfinite(self) -> NonfinitePolicy:
        """The kernel masks NaN/Inf itself; only sites that fall back follow a policy."""
        return self.fallback.nonfinite

    def with_policy(self, nonfinite: NonfinitePolicy) -> "TritonReduction":
        return TritonReduction(self.kernel, self.fallback.with_policy(nonfinite))

    def update(self, stats: "SiteStats", y: torch.Tensor, inp: torch.Tensor | None, unit_dim: int | None) -> None:
        if stats.activation.active_from_input and inp is not None or not self.kernel.accumulate(stats, y, unit_dim):
            self.fallback.update(stats, y, inp, unit_dim)
            return
        if stats.hist is not None:  # NaN/Inf go to the +inf bucket, which percentiles leave out
            values = y.float()
            histogram.update(stats.hist, torch.where(torch.isfinite(values), values, torch.inf))


def choose_reduction(requested: str, device: torch.device, nonfinite: NonfinitePolicy) -> tuple[Any, str | None]:
    """The route for this run, and a warning when `auto` had to give up the kernel.

    `auto`: the kernel on CUDA where triton imports and passes its self-check on this device;
    an explicit `triton` that cannot be met is a usage error (exit 2)."""
    torch_route = TorchReduction(nonfinite)
    if requested == "torch" or requested == "auto" and torch.device(device).type != "cuda":
        return torch_route, None  # without importing triton (a second of start-up) where it cannot be used
    kernel, import_error = _import_kernel()
    if kernel is None or not kernel.usable_on(device):
        if requested == "triton":
            why = import_error or f"it needs a CUDA device, not {device}"
            raise UsageError(f"--stats-kernel triton: the Triton statistics kernel cannot run here: {why}; "
                             "use --stats-kernel auto or torch")
        return torch_route, None
    problem = kernel.self_check(device)
    if problem is not None:
        if requested == "triton":
            raise UsageError(f"--stats-kernel triton: {problem}; use --stats-kernel torch")
        return torch_route, f"{problem}; site statistics were computed with PyTorch instead"
    return TritonReduction(kernel, torch_route), None
