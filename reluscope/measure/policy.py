"""How NaN/Inf outputs are kept out of the statistics: one policy per run, chosen by the backend."""

from __future__ import annotations

import enum
from typing import Any


class NonfinitePolicy(enum.Enum):
    """How NaN/Inf outputs are kept out of the statistics.

    NaN/Inf poison every reduction, and any of them makes the sum of squares non-finite.
    """

    # Look at each batch's sum of squares and take the NaN-safe path for batches that need it:
    # a host branch per site and batch, free on the CPU.
    CHECK = "check"
    # Take the fast path and raise a device-side flag; the run reads the flags once at the end and,
    # if any is set, measures again with MASKED. On an accelerator the branch of CHECK would be a
    # sync per site and batch. Only for data that can be read twice.
    DEFER = "defer"
    # The NaN-safe path (float64 sums, masked extremes) on every batch.
    MASKED = "masked"

    @classmethod
    def for_device(cls, device: Any) -> "NonfinitePolicy":
        """CHECK where a host branch is free (the CPU), else DEFER (a run on one-pass data, which
        cannot be measured again, takes MASKED instead: the torch backend decides that)."""
        return cls.CHECK if str(device).split(":", 1)[0] == "cpu" else cls.DEFER
