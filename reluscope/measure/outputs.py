"""Comparing a model's outputs with a changed copy's (reluscope prune's verification), and timing a call.

Outputs of any nesting (a tensor, a tuple, a dict, a Hugging Face output object) are flattened
to their arrays in order; backends hand numpy arrays. The figure users gate on is the largest
absolute difference relative to the output scale (the largest absolute reference value), so
that one tolerance serves logits of size 10 and of size 1e4 alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np


def flatten(outputs: Any) -> list[np.ndarray]:
    """The arrays of one forward pass's outputs, in a fixed order (dict keys sorted)."""
    if outputs is None:
        return []
    if isinstance(outputs, np.ndarray) or np.isscalar(outputs):
        return [np.asarray(outputs)]
    if isinstance(outputs, dict):
        return [array for key in sorted(outputs, key=str) for array in flatten(outputs[key])]
    if isinstance(outputs, (list, tuple)):
        return [array for item in outputs for array in flatten(item)]
    if hasattr(outputs, "to_tuple"):  # transformers' ModelOutput
        return flatten(outputs.to_tuple())
    return [np.asarray(outputs)]


@dataclass
class OutputCheck:
    """Reference vs candidate outputs over every batch compared."""

    samples: int = 0
    max_abs_diff: float = 0.0
    output_scale: float = 0.0
    mismatch: str | None = None  # outputs that cannot be compared (count, shape): the check fails
    problems: list[str] = field(default_factory=list)

    @property
    def relative(self) -> float:
        """max |reference - candidate| / max |reference| (the difference itself when the outputs are all 0)."""
        if self.mismatch is not None:
            return math.inf
        return self.max_abs_diff / self.output_scale if self.output_scale > 0 else self.max_abs_diff

    def passed(self, tolerance: float) -> bool:
        return self.mismatch is None and self.relative <= tolerance

    def add(self, reference: Any, candidate: Any, samples: int) -> None:
        """Fold one batch's outputs (any nesting; numpy arrays) into the comparison."""
        ref, new = flatten(reference), flatten(candidate)
        self.samples += samples
        if self.mismatch is not None:
            return
        if len(ref) != len(new):
            self.mismatch = f"the pruned model returns {len(new)} output(s), the original {len(ref)}"
            return
        for index, (a, b) in enumerate(zip(ref, new)):
            if a.shape != b.shape:
                self.mismatch = f"output {index} has shape {tuple(b.shape)}, the original's is {tuple(a.shape)}"
                return
            if a.size == 0:
                continue
            a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
            finite = np.isfinite(a64)
            if not np.array_equal(finite, np.isfinite(b64)) or not np.array_equal(a64[~finite], b64[~finite]):
                self.mismatch = f"output {index} has NaN/Inf where the original's has not (or other ones)"
                return
            if finite.any():
                self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(a64[finite] - b64[finite]))))
                self.output_scale = max(self.output_scale, float(np.max(np.abs(a64[finite]))))

    def to_dict(self, tolerance: float) -> dict[str, Any]:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff, "output_scale": self.output_scale,
                "relative_diff": None if self.mismatch is not None else self.relative,
                "tolerance": tolerance, "passed": self.passed(tolerance),
                **({"mismatch": self.mismatch} if self.mismatch is not None else {})}


def compare(pairs: Iterable[tuple[Any, Any, int]]) -> OutputCheck:
    """An OutputCheck over (reference outputs, candidate outputs, samples) per batch."""
    check = OutputCheck()
    for reference, candidate, samples in pairs:
        check.add(reference, candidate, samples)
    return check


def median_seconds(call: Callable[[], Any], *, repeats: int = 15, warmup: int = 3, budget: float = 5.0) -> float:
    """The median wall time of `call()` after `warmup` calls; fewer repeats when one call is slow
    (at most about `budget` seconds in all)."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < budget):
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    times.sort()
    return times[len(times) // 2]
