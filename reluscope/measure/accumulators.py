"""Accumulators declared once: each state's name, dtype, extent, merge operator and initial value.

As in torchmetrics' `Metric.add_state`, a class lists its states in one table and everything
that must treat every state alike (creation, `merge` of another shard, `add` of a batch that a
backend already reduced, `all_reduce` across torch.distributed ranks, `to_host`) loops over that
table, so a new state cannot be forgotten by one of them. Means are kept as (sum, count), never
as averages of averages; a merge is exact for counts, minima and maxima.

The states live in torch tensors on the measuring device (`TorchArrays`), or in numpy arrays on
the host (`NumpyArrays`: the ONNX route, whose site tensors come back from onnxruntime as numpy
arrays, so it never needs torch). Both follow the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

MERGE_OPERATORS = ("sum", "min", "max", "any")


@dataclass(frozen=True)
class State:
    """One accumulator: an array of `dtype` (a numpy/torch dtype name)."""

    name: str
    dtype: str  # "int64", "float64", "float32" or "bool"
    merge: str  # "sum", "min", "max" or "any"
    extent: str = "scalar"  # "scalar", "units" (one value per unit) or "buckets" (see `Accumulators.buckets`)
    initial: float = 0.0
    # Whether an accumulator object keeps this state at all (e.g. |y| sums only where a dormant score is
    # reported); a state it does not keep is None and every loop skips it.
    kept: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.merge not in MERGE_OPERATORS:
            raise ValueError(f"unknown merge operator {self.merge!r}")


class NumpyArrays:
    """States as numpy arrays on the host."""

    device = "cpu"
    _COMBINE = {"sum": np.add, "min": np.minimum, "max": np.maximum, "any": np.logical_or}

    def full(self, size: tuple[int, ...], value: float, dtype: str) -> np.ndarray:
        return np.full(size, value, dtype=dtype)

    def combine(self, merge: str, mine: np.ndarray, other: Any) -> np.ndarray:
        # straight to the state's dtype: a Python float must not pass through float32
        return self._COMBINE[merge](mine, np.asarray(other, dtype=mine.dtype))

    def host(self, value: np.ndarray, scalar: bool) -> Any:
        return value.item() if scalar else value.tolist()


class TorchArrays:
    """States as torch tensors on the measuring device (imported only where torch measures)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._combine = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum, "any": torch.logical_or}

    def full(self, size: tuple[int, ...], value: float, dtype: str) -> Any:
        return self.torch.full(size, value, dtype=getattr(self.torch, dtype), device=self.device)

    def combine(self, merge: str, mine: Any, other: Any) -> Any:
        other = self.torch.as_tensor(other, dtype=mine.dtype, device=mine.device)
        return self._combine[merge](mine, other)

    def host(self, value: Any, scalar: bool) -> Any:
        host = value.cpu()
        return host.item() if scalar else host.tolist()


def arrays_for(device: Any) -> NumpyArrays | TorchArrays:
    """numpy for the host route (device None), torch tensors on `device` otherwise."""
    return NumpyArrays() if device is None else TorchArrays(device)


class Accumulators:
    """Base of a set of declared states plus host-side integer counters (summed on merge).

    Subclasses set `STATES` and `COUNTERS`, call `_create_states(arrays, units)` once, and write
    only their `update`; merging, ranks and readout come from here.
    """

    STATES: ClassVar[tuple[State, ...]] = ()
    COUNTERS: ClassVar[tuple[str, ...]] = ()  # plain ints: shapes and batch counts are host metadata
    arrays: NumpyArrays | TorchArrays

    def buckets(self) -> int:
        """Length of a "buckets" state (subclasses with one say how long it is)."""
        raise NotImplementedError

    def keeps(self, state: State) -> bool:
        return state.kept is None or state.kept(self)

    def _create_states(self, arrays: NumpyArrays | TorchArrays, units: int = 1) -> None:
        self.arrays = arrays
        for state in self.STATES:
            value = None
            if self.keeps(state):
                size = () if state.extent == "scalar" else (units,) if state.extent == "units" else (self.buckets(),)
                value = arrays.full(size, state.initial, state.dtype)
            setattr(self, state.name, value)
        for counter in self.COUNTERS:
            setattr(self, counter, 0)

    def states(self) -> list[tuple[State, Any]]:
        """(declaration, array) of every state this object keeps, in table order."""
        return [(state, getattr(self, state.name)) for state in self.STATES if getattr(self, state.name) is not None]

    def add(self, **values: Any) -> None:
        """Fold values that describe one batch (arrays, tensors or numbers; a backend's own
        reductions, e.g. from inside an ONNX graph) with each state's merge operator. States and
        counters not named are left as they are."""
        for state, mine in self.states():
            if state.name in values and values[state.name] is not None:
                setattr(self, state.name, self.arrays.combine(state.merge, mine, values[state.name]))
        for counter in self.COUNTERS:
            if counter in values:
                setattr(self, counter, getattr(self, counter) + int(values[counter]))

    def merge(self, other: "Accumulators") -> None:
        """Fold another accumulator of the same kind (another shard or process) into this one."""
        self.add(**{state.name: value for state, value in other.states()},
                 **{counter: getattr(other, counter) for counter in self.COUNTERS})

    def all_reduce(self) -> None:
        """`merge` across torch.distributed ranks: the same operators, applied by the collective."""
        import torch

        from ..distributed import all_reduce, all_reduce_int

        for state, value in self.states():
            if state.merge == "any":  # no collective reduces bools: max over 0/1
                setattr(self, state.name, all_reduce(value.to(torch.int32), "max").bool())
            else:
                all_reduce(value, state.merge)
        for counter in self.COUNTERS:
            setattr(self, counter, all_reduce_int(getattr(self, counter), self.arrays.device))

    def to_host(self) -> dict[str, Any]:
        """Every state and counter as plain Python values: the one device-to-host transfer."""
        out: dict[str, Any] = {counter: getattr(self, counter) for counter in self.COUNTERS}
        for state in self.STATES:
            value = getattr(self, state.name)
            out[state.name] = None if value is None else self.arrays.host(value, state.extent == "scalar")
        return out
