"""The format-blind wiring: open the model's backend, measure the calibration data, build the report."""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any, Callable

from ._version import __version__
from .config import AnalyzeConfig
from .errors import InputError
from .report import Report, Thresholds, build_layer, build_summary
from .run import ProgressCallback, Run

if TYPE_CHECKING:
    from .backends.base import Backend
    from .data import DataSource


def analyze(model: Any, data: Any = None, *, progress: ProgressCallback | None = None,
            on_start: Callable[[int | None], None] | None = None, **options: Any) -> Report:
    """Analyse every ReLU-family activation site of `model` on `data`.

    `model` is an `nn.Module` (handed back as it came: mode, device, hooks), or a path to a
    state_dict (with `arch`), TorchScript, torch.export or ONNX file. `data` is a tensor, an
    array, a path (.npy/.npz/.pt/image folder), any iterable of batches, or None for
    synthetic inputs of `input_shape` (per sample). `stats_kernel` picks how site statistics
    are reduced: "triton" (one pass per activation, CUDA), "torch", or "auto" (Triton on CUDA
    where the triton package is installed).

    `options` are the settings of `reluscope analyze` (options.ANALYSIS_OPTIONS), as keywords;
    `input_shape` is a sequence of ints. Any other keyword is a TypeError. `progress` is called
    with the number of samples of each batch measured, `on_start` once with the planned total
    (None when unknown).
    """
    config = AnalyzeConfig.from_keywords(options)
    return run_analysis(model, data, config, progress=progress, on_start=on_start)


def _declare_keywords() -> None:
    """Show analyze's keywords, one per declared analysis option, to help(), inspect and editors."""
    from .options import ANALYSIS_OPTIONS

    signature = inspect.signature(analyze)
    fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    declared = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                  annotation=o.field_type or o.type) for o in ANALYSIS_OPTIONS]
    analyze.__signature__ = signature.replace(parameters=[*fixed, *declared])  # type: ignore[attr-defined]
    analyze.__doc__ = (analyze.__doc__ or "") + "\n    Options:\n\n" + "".join(
        f"    {o.name} = {o.default!r}: {o.help}\n" for o in ANALYSIS_OPTIONS)


_declare_keywords()


def run_analysis(model: Any, data: Any, config: AnalyzeConfig, *, progress: ProgressCallback | None = None,
                 on_start: Callable[[int | None], None] | None = None) -> Report:
    """`analyze` with its options already validated (the CLI's entry point)."""
    started = time.perf_counter()
    backend, source = open_analysis(model, data, config)
    return measure(backend, source, config, started, progress=progress, on_start=on_start)


def open_analysis(model: Any, data: Any, config: AnalyzeConfig) -> tuple[Backend, DataSource]:
    """The model's backend and the calibration data source, both checked and ready to measure."""
    from . import data as data_sources
    from .backends import open_model

    backend = open_model(model, arch=config.arch, trust_checkpoint=config.trust_checkpoint)
    source = data_sources.from_object(data, input_shape=config.input_shape, tokenizer=backend.loaded.tokenizer,
                                      max_length=config.max_length, normalize=config.normalize)
    return backend, source


def measure(backend: Backend, source: DataSource, config: AnalyzeConfig, started: float, *,
            progress: ProgressCallback | None = None,
            on_start: Callable[[int | None], None] | None = None) -> Report:
    """Measure `source` through `backend` and build the report (`started`: when the run began, for its seconds)."""
    from . import data as data_sources

    run = Run(config, source, progress)
    run.warnings.extend(data_sources.normalize_warnings(source, config.normalize, backend.loaded.module))
    run.keep_warnings()
    if on_start is not None:
        on_start(source.planned_samples(config.max_samples))
    measured = backend.measure(run)
    if run.samples == 0:
        raise InputError(f"calibration data {source.description} yielded no samples; give at least one sample")
    if len(measured.recorder) == 0:
        run.warnings.append("no ReLU-family activation was called during the forward pass; nothing to analyse")

    thresholds = Thresholds(rare=config.rare_threshold, dormant_tau=config.dormant_tau)
    layers = [build_layer(info, host, thresholds, hard_zero=act.hard_zero, upper=act.upper)
              for info, act, host in measured.recorder.host_view()]
    for layer, gradient in zip(layers, measured.recorder.gradient_view()):
        if gradient is not None:
            layer["gradient"] = gradient
    backend_run = measured.run
    return Report(
        tool={"name": "reluscope", "version": __version__},
        model=backend.describe(),
        data={"source": source.description, "samples": run.samples, "synthetic": source.synthetic,
              **({"normalize": source.normalize.to_dict()} if source.normalize is not None else {})},
        run={"backend": backend_run["backend"], "device": backend_run["device"],
             "processes": backend_run["processes"], "seconds": round(time.perf_counter() - started, 4),
             "rare_threshold": config.rare_threshold, "dormant_tau": config.dormant_tau,
             **{key: value for key, value in backend_run.items() if key not in ("backend", "device", "processes")}},
        layers=layers,
        summary=build_summary(layers),
        warnings=run.warnings,
        unanalysed=run.unanalysed,
        gradient_flow=measured.gradient_flow,
    )
