"""The contract between the format-blind wiring (`api.py`) and a backend (one runtime).

A `Backend` holds one loaded model and knows everything its runtime needs: devices, how to
capture sites, how to reduce their tensors, what to restore. `measure(run)` streams the run's
batches through a `Session` and returns a `Measurement`: what the report needs, in
format-neutral terms. A `Session` is a context manager (as Polygraphy's runners are) whose
`run(inputs)` feeds one batch; on exit it restores every hook, mode and setting it touched,
also when the forward pass raised.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..data import Batch
    from ..measure.outputs import OutputCheck
    from ..measure.recorder import SiteRecorder
    from ..run import Run


@dataclass
class LoadedModel:
    """A model as a loader produced it, before any backend state exists."""

    module: Any  # nn.Module, ScriptModule, GraphModule or an onnx ModelProto
    format: str  # one of FORMATS (reluscope.backends)
    path: str | None = None
    sha256: str | None = None
    export_plan: list[tuple[str, str]] | None = None  # site names of a flattened exported graph
    notes: list[str] = field(default_factory=list)  # what the run warns about (e.g. which weights were used)
    # Text calibration data (.txt/.jsonl) needs one: `encode(texts, max_length)` -> (inputs, attention mask),
    # `check()` fails early where the model cannot tokenize (a Hugging Face folder's tokenizer)
    tokenizer: Any = None


@dataclass
class Measurement:
    """What one backend measured, beyond what the shared `Run` collected (samples, warnings, unanalysed sites)."""

    recorder: "SiteRecorder"
    run: dict[str, Any]  # backend, device, processes... (the report's `run` fields this backend knows)
    gradient_flow: dict[str, Any] | None = None


@dataclass
class PruneRequest:
    """What `reluscope prune` asks a backend: remove these units, keep the outputs."""

    candidates: dict[str, list[int]]  # site name -> units to remove (dead, or rarely active when asked)
    batches: list["Batch"]  # the calibration data, held in memory: every pass of the prune reads it again
    tolerance: float  # largest relative output difference (measure.outputs.OutputCheck.relative) accepted
    # the candidates that are rarely active, not dead (--include-rarely-active): not exact, so the
    # verification decides; consumers get the unit's mean instead of its constant
    rarely_active: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Pruning:
    """A backend's pruned model, what it removed and kept per site, and how close its outputs stayed."""

    model: Any  # the pruned copy (nn.Module or onnx ModelProto); the backend's own model is unchanged
    removed: dict[str, list[int]]  # site name -> units removed (indices of the original model)
    kept: dict[str, dict[int, str]]  # site name -> candidate unit -> why it stays
    check: "OutputCheck"  # original vs pruned on the calibration batches
    notes: list[str] = field(default_factory=list)  # what the prune report should warn about


class Session(abc.ABC):
    """A model made ready to run with its sites captured; restores what it touched on exit."""

    unanalysed: list[dict[str, str]]  # sites found but not measurable this way: {"name", "reason"}

    def __enter__(self) -> "Session":
        return self

    @abc.abstractmethod
    def __exit__(self, *exc: object) -> None: ...

    @abc.abstractmethod
    def run(self, inputs: tuple[Any, ...] | dict[str, Any]) -> Any:
        """Feed one batch (batch axis first); returns the model's output."""

    def input_hint(self, shapes: list[tuple[int, ...]]) -> str | None:
        """After a failed forward pass: what input the model seems to expect, if it can tell."""
        return None


class Backend(abc.ABC):
    """One loaded model and the runtime that measures it."""

    name: str  # the report's run.backend: "torch" or "onnxruntime"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def describe(self) -> dict[str, Any]:
        """The report's `model` block."""
        return {"path": self.loaded.path, "format": self.loaded.format, "sha256": self.loaded.sha256}

    @abc.abstractmethod
    def measure(self, run: "Run") -> Measurement:
        """Stream `run`'s batches through the model and return the sites' accumulators."""

    # pruning (reluscope prune): a backend that cannot prune says so in one line, before any analysis
    def check_prunable(self, suffix: str | None) -> None:
        """Raise a UsageError when this model cannot be pruned, or not written as a `suffix` file."""
        from ..errors import UsageError

        raise UsageError(f"reluscope prune cannot prune a {self.loaded.format} model; give a PyTorch state_dict "
                         "with --arch, a trusted pickled module, or an ONNX file")

    def prune_through(self, batch: "Batch") -> tuple[bytes, str, str] | None:
        """None when this backend prunes its model itself; else (the bytes of the model in a format another
        backend prunes, that file's suffix, a note for the report): for models whose layers are compiled
        into a graph. `batch` is an example input for exporters."""
        return None

    def prune(self, request: PruneRequest) -> Pruning:
        """Remove `request.candidates` from a copy of the model, folding what they fed into the consumers'
        biases, keeping coupled units that are not removable everywhere, and verifying the outputs."""
        raise NotImplementedError

    def cost(self, model: Any, batch: "Batch") -> dict[str, Any]:
        """{"parameters", "macs", "latency_ms"} of `model` (this backend's kind) on one calibration batch, on CPU."""
        raise NotImplementedError

    def serialize(self, model: Any, suffix: str, batch: "Batch") -> bytes:
        """`model` (a pruned copy) as the bytes of a `suffix` file (".pt", ".pt2", ".onnx"); a suffix this
        backend cannot write is a UsageError naming the ones it can."""
        raise NotImplementedError
