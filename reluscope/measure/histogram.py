"""A mergeable streaming histogram for percentiles, with a fixed relative error bound.

Buckets come straight from the float32 bit pattern: the exponent plus the top
MANTISSA_BITS bits of the mantissa. A bucket therefore spans a relative width of at most
2**-MANTISSA_BITS, and reporting its midpoint errs by at most half that:

    relative error of a reported percentile <= 2**-(MANTISSA_BITS + 1) = 0.39 %

for every normal float32 value (|x| >= 1.2e-38; smaller values land in the zero bucket's
neighbours). Counts are exact integers, so histograms of batches, shards and ranks merge by
addition, and the percentile's *rank* is exact. Costs a few elementwise passes and a bincount
per site and batch, so it is off unless asked for (--percentiles).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MANTISSA_BITS = 7
_SHIFT = 23 - MANTISSA_BITS
MAGNITUDE_BUCKETS = (0x7F800000 >> _SHIFT) + 1  # up to and including the +inf pattern
RELATIVE_ERROR = 2.0 ** -(MANTISSA_BITS + 1)
PERCENTILES = (("p1", 0.01), ("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999))


def bucket_count(signed: bool) -> int:
    """Counts: magnitudes only (non-negative activations) or negatives mirrored below zero."""
    return MAGNITUDE_BUCKETS * (2 if signed else 1)


def update(counts: Any, values: Any) -> None:
    """Add one batch of finite float values (NaN/Inf are left to the nonfinite counter): torch
    tensors into torch counts on their device, numpy arrays into numpy counts."""
    if isinstance(counts, np.ndarray):
        counts += np.bincount(_keys(np.asarray(values, dtype=np.float32).reshape(-1), counts.size, np),
                              minlength=counts.size)[: counts.size]
        return
    import torch

    with torch.no_grad():
        x = values.detach().reshape(-1).float()
        counts += torch.bincount(_keys(x, counts.numel(), torch), minlength=counts.numel())[: counts.numel()]


def _keys(x: Any, buckets: int, xp: Any) -> Any:
    """Bucket index of each float32 value: its bit pattern's top bits (numpy and torch alike)."""
    signed = buckets > MAGNITUDE_BUCKETS
    int32 = xp.int32
    if signed:
        keys = (abs(x).view(int32) >> _SHIFT).clip(max=MAGNITUDE_BUCKETS - 1)
        # Order buckets by value: negatives (largest magnitude first), then zero and positives.
        return xp.where(x < 0, MAGNITUDE_BUCKETS - 1 - keys, MAGNITUDE_BUCKETS + keys)
    # Non-negative outputs: the bit pattern is the key; -0.0 (sign bit set, a negative int) clamps into
    # the zero bucket. int32 keys: bincount needs no int64 copy.
    return (x.view(int32) >> _SHIFT).clip(0, MAGNITUDE_BUCKETS - 1)


def _bucket_value(index: int, signed: bool) -> float:
    negative = signed and index < MAGNITUDE_BUCKETS
    key = (MAGNITUDE_BUCKETS - 1 - index) if negative else (index - MAGNITUDE_BUCKETS if signed else index)
    low = _from_bits(key << _SHIFT)
    high = _from_bits(((key + 1) << _SHIFT) - 1)
    value = 0.0 if key == 0 else (low + high) / 2
    return -value if negative else value


def _from_bits(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def percentiles(counts: list[int], signed: bool, exclude_nonfinite: bool = True) -> dict[str, float] | None:
    """Percentiles (nearest rank) from host-side bucket counts."""
    if exclude_nonfinite:
        counts = list(counts)
        inf_key = MAGNITUDE_BUCKETS - 1  # the +/-inf and NaN patterns clamp here
        for index in ((MAGNITUDE_BUCKETS + inf_key, MAGNITUDE_BUCKETS - 1 - inf_key) if signed else (inf_key,)):
            counts[index] = 0
    total = sum(counts)
    if total == 0:
        return None
    out: dict[str, float] = {}
    targets = [(name, max(1, math.ceil(q * total))) for name, q in PERCENTILES]
    running, position = 0, 0
    for index, count in enumerate(counts):
        if not count:
            continue
        running += count
        while position < len(targets) and running >= targets[position][1]:
            out[targets[position][0]] = _bucket_value(index, signed)
            position += 1
        if position == len(targets):
            break
    return out
