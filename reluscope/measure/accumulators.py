"""Accumulators declared once: each state's name, dtype, extent, merge operator and initial value.

As in torchmetrics' `Metric.add_state`, a class lists its states in one table and everything
that must treat every state alike (creation, `merge` of another shard, `add` of a batch that a
backend already reduced, `all_reduce` across torch.distributed ranks, `to_host`) loops over that
table, so a new state cannot be forgotten by one of them. Means are kept as (sum, count), never
as averages of averages; a merge is exact for counts, minima and maxima.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

# merge operator -> how two values of a state combine (in place where possible)
_COMBINE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add,
    "min": torch.minimum,
    "max": torch.maximum,
    "any": torch.logical_or,
}


@dataclass(frozen=True)
class State:
    """One accumulator: a tensor on the measuring device."""

    name: str
    dtype: torch.dtype
    merge: str  # "sum", "min", "max" or "any"
    extent: str = "scalar"  # "scalar", "units" (one value per unit) or "buckets" (see `Accumulators.buckets`)
    initial: float = 0.0
    # Whether an accumulator object keeps this state at all (e.g. |y| sums only where a dormant score is
    # reported); a state it does not keep is None and every loop skips it.
    kept: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.merge not in _COMBINE:
            raise ValueError(f"unknown merge operator {self.merge!r}")


class Accumulators:
    """Base of a set of declared states plus host-side integer counters (summed on merge).

    Subclasses set `STATES` and `COUNTERS`, call `_create_states(device, units)` once, and write
    only their `update`; merging, ranks and readout come from here.
    """

    STATES: ClassVar[tuple[State, ...]] = ()
    COUNTERS: ClassVar[tuple[str, ...]] = ()  # plain ints: shapes and batch counts are host metadata

    def buckets(self) -> int:
        """Length of a "buckets" state (subclasses with one say how long it is)."""
        raise NotImplementedError

    def keeps(self, state: State) -> bool:
        return state.kept is None or state.kept(self)

    def _create_states(self, device: torch.device, units: int = 1) -> None:
        for state in self.STATES:
            value = None
            if self.keeps(state):
                size = () if state.extent == "scalar" else (units,) if state.extent == "units" else (self.buckets(),)
                value = torch.full(size, state.initial, dtype=state.dtype, device=device)
            setattr(self, state.name, value)
        for counter in self.COUNTERS:
            setattr(self, counter, 0)

    def states(self) -> list[tuple[State, torch.Tensor]]:
        """(declaration, tensor) of every state this object keeps, in table order."""
        return [(state, getattr(self, state.name)) for state in self.STATES if getattr(self, state.name) is not None]

    @torch.no_grad()
    def add(self, **values: Any) -> None:
        """Fold values that describe one batch (tensors, arrays or numbers; a backend's own
        reductions, e.g. from inside an ONNX graph) with each state's merge operator. States and
        counters not named are left as they are."""
        for state, mine in self.states():
            if state.name in values and values[state.name] is not None:
                # straight to the state's dtype: a Python float must not pass through float32
                other = torch.as_tensor(values[state.name], dtype=mine.dtype, device=mine.device)
                setattr(self, state.name, _COMBINE[state.merge](mine, other))
        for counter in self.COUNTERS:
            if counter in values:
                setattr(self, counter, getattr(self, counter) + int(values[counter]))

    @torch.no_grad()
    def merge(self, other: "Accumulators") -> None:
        """Fold another accumulator of the same kind (another shard or process) into this one."""
        self.add(**{state.name: value for state, value in other.states()},
                 **{counter: getattr(other, counter) for counter in self.COUNTERS})

    def all_reduce(self) -> None:
        """`merge` across torch.distributed ranks: the same operators, applied by the collective."""
        from ..distributed import all_reduce, all_reduce_int

        for state, value in self.states():
            if state.merge == "any":  # no collective reduces bools: max over 0/1
                setattr(self, state.name, all_reduce(value.to(torch.int32), "max").bool())
            else:
                all_reduce(value, state.merge)
        device = next((value.device for _, value in self.states()), torch.device("cpu"))
        for counter in self.COUNTERS:
            setattr(self, counter, all_reduce_int(getattr(self, counter), device))

    def to_host(self) -> dict[str, Any]:
        """Every state and counter as plain Python values: the one device-to-host transfer."""
        out: dict[str, Any] = {counter: getattr(self, counter) for counter in self.COUNTERS}
        for state in self.STATES:
            value = getattr(self, state.name)
            if value is None:
                out[state.name] = None
            else:
                host = value.cpu()
                out[state.name] = host.tolist() if state.extent != "scalar" else host.item()
        return out
