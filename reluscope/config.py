"""Frozen options of one analysis, validated once at the edge (CLI or API)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class AnalyzeConfig:
    device: str = "auto"
    batch_size: int = 64
    max_samples: int | None = None
    input_shape: tuple[int, ...] | None = None
    unit_axis: int | None = None
    arch: str | None = None
    trust_checkpoint: bool = False
    rare_threshold: float = 0.01
    dormant_tau: float = 0.025
    gradients: bool = False
    loss: str | None = None
    percentiles: bool = False
    stats_kernel: str = "auto"  # auto, triton or torch (see stats.resolve_kernel)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max-samples must be at least 1, not {self.max_samples}")
        if not 0.0 <= self.rare_threshold <= 1.0:
            raise UsageError(f"--rare-threshold must lie in [0, 1], not {self.rare_threshold}")
        if self.dormant_tau < 0.0:
            raise UsageError(f"--dormant-tau must be non-negative, not {self.dormant_tau}")
        if self.stats_kernel not in ("auto", "triton", "torch"):
            raise UsageError(f"--stats-kernel {self.stats_kernel!r} must be auto, triton or torch")
        device = self.device.lower()
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()):
            raise UsageError(f"--device {self.device!r} must be auto, cpu, cuda or cuda:N")
