"""The batch loop every backend shares: batches of the calibration data, progress, the warnings a
run collects, and the wording of a forward pass that failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ModelRunError, ReluscopeError, first_line

if TYPE_CHECKING:
    from .backends.base import Session
    from .config import AnalyzeConfig
    from .data import Batch, DataSource
    from .measure.recorder import SiteRecorder

ProgressCallback = Callable[[int], None]

SYNTHETIC_WARNING = ("no --data given: analysing synthetic normal inputs. Dead-unit and sparsity findings on random "
                     "data say little about the trained model; pass real calibration data with --data")


@dataclass
class Run:
    """What one analysis threads through its measuring loop."""

    config: "AnalyzeConfig"
    source: "DataSource"
    progress: ProgressCallback | None = None
    recorder: "SiteRecorder | None" = None  # the backend creates it with the reduction route it chose
    samples: int = 0
    warnings: list[str] = field(default_factory=list)
    unanalysed: list[dict[str, str]] = field(default_factory=list)
    kept_warnings: int = 0  # warnings from before the measuring loop, which a restart keeps

    def __post_init__(self) -> None:
        if self.source.synthetic:
            self.warnings.append(SYNTHETIC_WARNING)
        self.keep_warnings()

    def keep_warnings(self) -> None:
        """The warnings so far stay when the run restarts."""
        self.kept_warnings = len(self.warnings)

    def restart(self, **recorder_changes: Any) -> None:
        """Forget what the measuring loop gathered, to measure again from the first batch."""
        if self.recorder is not None:
            self.recorder = self.recorder.fresh(**recorder_changes)
        self.samples = 0
        self.unanalysed.clear()
        del self.warnings[self.kept_warnings:]

    def batches(self, owns: Callable[[int], bool] | None = None, ranks: int = 1) -> Iterator["Batch"]:
        """The calibration batches (under torchrun, those `owns` gives this rank; `ranks` scales progress)."""
        for batch in self.source.batches(self.config.batch_size, self.config.max_samples, owns=owns):
            yield batch
            self.samples += batch.size
            if self.progress is not None:
                self.progress(batch.size * ranks)

    def forward(self, session: "Session", inputs: tuple[Any, ...] | dict[str, Any]) -> Any:
        """`session.run(inputs)`, with the model's own failure turned into one line that says which batch
        failed, with what input, and what the model seems to expect."""
        try:
            return session.run(inputs)
        except ReluscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own code raised
            values = inputs.values() if isinstance(inputs, dict) else inputs
            shapes = [tuple(v.shape) for v in values if hasattr(v, "shape")]
            given = ", ".join(f"{k}={tuple(v.shape)}" for k, v in inputs.items()) if isinstance(inputs, dict) else \
                ", ".join(str(shape) for shape in shapes)
            hint = None if isinstance(inputs, dict) else session.input_hint(shapes)
            raise ModelRunError(f"the model's forward pass failed on the batch starting at sample {self.samples} "
                                f"(input shape {given}{'; ' + hint if hint else ''}): {first_line(exc)}. Check "
                                "that --data or --input-shape matches what the model expects") from exc
