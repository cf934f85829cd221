"""`reluscope prune`, format-blind: analyse, choose the units to remove, let the backend remove them,
verify, measure the cost before and after, and say what happened to every candidate.

A unit is a candidate when it is dead at a hard-zero site (ReLU, ReLU6, clamp at 0, hardsigmoid:
its output is exactly 0 on every calibration sample), or, with `include_rarely_active`, rarely
active there (not exact: the verification decides). The backend removes what it can remove
exactly (Backend.prune) and keeps the rest with a reason; the outputs of the original and the
pruned model on the calibration data must agree within `tolerance` (relative to the output
scale), else the prune fails and no model is written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ._version import __version__
from .config import AnalyzeConfig
from .errors import UsageError
from .measure.sites import hard_zero_label

if TYPE_CHECKING:
    from .backends.base import Backend, Pruning
    from .report import Report
    from .run import ProgressCallback

PRUNE_KIND = "prune"
MODEL_SUFFIXES = (".pt", ".pt2", ".onnx")


@dataclass(frozen=True)
class PruneSettings:
    """What `reluscope prune` adds to the analysis options."""

    tolerance: float = 1e-5
    sites: tuple[str, ...] = ()  # fnmatch patterns on site names; empty: every site
    include_rarely_active: bool = False
    output_suffix: str | None = None  # the format the pruned model is written in; None: not written
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not (self.tolerance >= 0 and self.tolerance == self.tolerance):
            raise UsageError(f"--tolerance must be a non-negative number, not {self.tolerance}")
        if self.output_suffix is not None and self.output_suffix not in MODEL_SUFFIXES:
            raise UsageError(f"-o must name a .pt, .pt2 or .onnx file (the pruned model's format), not "
                             f"{self.output_suffix or 'a file without a suffix'}")


@dataclass
class PruneResult:
    """The pruned model (a copy; None when verification failed), its file's bytes when asked for, and the report."""

    model: Any
    report: dict[str, Any]
    payload: bytes | None = None


def candidates_of(layers: Sequence[dict[str, Any]], settings: PruneSettings
                  ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(site -> units to remove, site -> those of them that are only rarely active), in report order. Every
    selected hard-zero site is a key, also without candidates: a unit coupled to it must be a candidate there."""
    chosen: dict[str, list[int]] = {}
    rare: dict[str, list[int]] = {}
    for layer in layers:
        name = layer["name"]
        if not hard_zero_label(layer["op"]):
            continue
        if settings.sites and not any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.sites):
            continue
        units = list(layer["dead_units"])
        if settings.include_rarely_active:
            rare[name] = list(layer["rarely_active_units"])
            units += rare[name]
        chosen[name] = sorted(units)
    return chosen, rare


def run_prune(model: Any, data: Any, config: AnalyzeConfig, settings: PruneSettings, *,
              progress: "ProgressCallback | None" = None,
              on_stage: "Callable[[str], None] | None" = None) -> PruneResult:
    """The whole prune with validated options (the CLI's entry point; `reluscope.prune` wraps it).
    `progress` gets the samples of each analysed batch; `on_stage` the name of each step as it starts."""
    stage = on_stage or (lambda name: None)
    from .api import measure, open_analysis
    from .backends.base import PruneRequest

    started = time.perf_counter()
    backend, source = open_analysis(model, data, config)
    backend.check_prunable(settings.output_suffix)
    if not source.replayable:
        raise UsageError("reluscope prune reads the calibration data several times (analysis, folding, "
                         "verification); give arrays, a file or a list of batches, not a one-pass iterator")
    stage("analysing")
    analysis = measure(backend, source, config, started, progress=progress)
    batches = list(source.batches(config.batch_size, config.max_samples))
    candidates, rare = candidates_of(analysis.layers, settings)
    with _pruner_for(backend, batches[0]) as (pruner, note):
        stage("pruning and verifying")
        pruning = pruner.prune(PruneRequest(candidates, batches, settings.tolerance, rarely_active=rare))
        if note is not None:
            pruning.notes.insert(0, note)
        passed = pruning.check.passed(settings.tolerance)
        stage("measuring the cost")
        cost = {"before": pruner.cost(pruner.loaded.module, batches[0]),
                "after": pruner.cost(pruning.model, batches[0]) if passed else None}
        payload = None
        if passed and settings.output_suffix is not None and not settings.dry_run:
            stage("saving")
            payload = pruner.serialize(pruning.model, settings.output_suffix, batches[0])
    report = build_report(analysis, pruning, candidates, rare, cost, settings, seconds=time.perf_counter() - started)
    return PruneResult(pruning.model if passed else None, report, payload)


@contextlib.contextmanager
def _pruner_for(backend: "Backend", batch: Any) -> Iterator[tuple["Backend", str | None]]:
    """The backend that prunes `backend`'s model: itself, or, for a model whose layers are compiled into
    a graph, a backend for the export it hands over (opened from a temporary file), with a note saying so."""
    handed = backend.prune_through(batch)
    if handed is None:
        yield backend, None
        return
    from .backends import open_model

    payload, suffix, why = handed
    with tempfile.TemporaryDirectory(prefix="reluscope-prune-") as folder:
        path = Path(folder) / f"model{suffix}"
        path.write_bytes(payload)
        yield open_model(path), why


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def build_report(analysis: "Report", pruning: "Pruning", candidates: dict[str, list[int]],
                 rare: dict[str, list[int]], cost: dict[str, Any], settings: PruneSettings, *,
                 seconds: float) -> dict[str, Any]:
    from .report import SCHEMA_VERSION

    sites = []
    for layer in analysis.layers:
        name = layer["name"]
        removed = pruning.removed.get(name, [])
        kept = pruning.kept.get(name, {})
        if not hard_zero_label(layer["op"]) and not removed:
            continue
        sites.append({
            "name": name,
            "op": layer["op"],
            "units_before": layer["units"],
            "units_after": layer["units"] - len(removed),
            "dead_units": layer["dead_units"],
            "candidates": candidates.get(name, []),
            "rarely_active_candidates": rare.get(name, []),
            "removed_units": removed,
            "kept_units": [{"unit": unit, "reason": reason} for unit, reason in sorted(kept.items())],
        })
    before, after = cost["before"], cost["after"]
    removed_total = sum(len(site["removed_units"]) for site in sites)
    warnings = list(analysis.warnings) + list(pruning.notes)
    if not any(candidates.values()):
        warnings.append("nothing to prune: no unit is dead at a hard-zero site"
                        + (" matching --sites" if settings.sites else "") + "; the model is unchanged")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": PRUNE_KIND,
        "tool": {"name": "reluscope", "version": __version__},
        "model": analysis.model,
        "data": analysis.data,
        "run": {**{k: analysis.run[k] for k in ("backend", "device", "batch_size") if k in analysis.run},
                "seconds": round(seconds, 4), "tolerance": settings.tolerance, "sites": list(settings.sites),
                "include_rarely_active": settings.include_rarely_active, "rare_threshold":
                analysis.run.get("rare_threshold")},
        "sites": sites,
        "summary": {
            "sites": len(sites),
            "units_before": sum(site["units_before"] for site in sites),
            "units_after": sum(site["units_after"] for site in sites),
            "candidates": sum(len(site["candidates"]) for site in sites),
            "removed_units": removed_total,
            "kept_units": sum(len(site["kept_units"]) for site in sites),
            "parameters_before": before["parameters"],
            "parameters_after": after["parameters"] if after else None,
            "parameters_ratio": _ratio(after and after["parameters"], before["parameters"]),
            "macs_before": before["macs"],
            "macs_after": after["macs"] if after else None,
            "macs_ratio": _ratio(after and after["macs"], before["macs"]),
            "latency_ms_before": before["latency_ms"],
            "latency_ms_after": after["latency_ms"] if after else None,
            "latency_ratio": _ratio(after and after["latency_ms"], before["latency_ms"]),
        },
        "verification": pruning.check.to_dict(settings.tolerance),
        "output": {"path": None, "format": settings.output_suffix, "written": False, "dry_run": settings.dry_run},
        "warnings": warnings,
        **({"unanalysed": analysis.unanalysed} if analysis.unanalysed else {}),
    }


def prune(model: Any, data: Any = None, *, tolerance: float = 1e-5, sites: Sequence[str] = (),
          include_rarely_active: bool = False, output: str | Path | None = None,
          **options: Any) -> tuple[Any, dict[str, Any]]:
    """Remove the units `model` never uses on `data`; returns (pruned model, report).

    `model` and `data` are what `reluscope.analyze` takes, and `options` its options. The pruned
    model is a copy (an `nn.Module` for PyTorch models, an `onnx.ModelProto` for ONNX ones);
    `model` itself is not changed. When the pruned outputs differ from the original's by more than
    `tolerance` (relative to the output scale) on `data`, the pruned model is None and
    `report["verification"]["passed"]` is False. With `output`, the pruned model is also written
    there (.pt, .pt2 or .onnx), atomically, only when the verification passed.
    """
    config = AnalyzeConfig.from_keywords(options)
    target = Path(output) if output is not None else None
    settings = PruneSettings(tolerance=tolerance, sites=tuple(sites), include_rarely_active=include_rarely_active,
                             output_suffix=target.suffix.lower() if target is not None else None)
    result = run_prune(model, data, config, settings)
    if target is not None and result.payload is not None:
        from .output import write_together

        write_together([(target, result.payload)])
        result.report["output"].update(path=str(target), written=True)
    return result.model, result.report
