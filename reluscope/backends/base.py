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
