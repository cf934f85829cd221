"""The one place that wires loader -> capture -> statistics -> report."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .config import AnalyzeConfig
from .errors import InputError, ModelRunError, ReluscopeError, UsageError, first_line as error_line
from .backends.torch.inputs import expectation, input_caster
from .report import Report, Thresholds, build_layer, build_summary

SYNTHETIC_WARNING = ("no --data given: analysing synthetic normal inputs. Dead-unit and sparsity findings on random "
                     "data say little about the trained model; pass real calibration data with --data")

ONNX_GRADIENTS = ("gradient flow needs the PyTorch model: ONNX graphs are analysed with onnxruntime, which has no "
                  "backward pass; analyse the .pt/.pt2/TorchScript file with --gradients")

ProgressCallback = Callable[[int], None]


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
    from . import data as data_sources
    from .measure.recorder import SiteRecorder
    from .distributed import World, init, shutdown, world_from_env
    from .measure.stats import defers_nonfinite, release_chunk_buffers

    started = time.perf_counter()
    loaded = _load(model, config)
    source = data_sources.from_object(data, input_shape=config.input_shape)
    onnx = loaded.format == "onnx"
    world = world_from_env() if not onnx else World()
    dev = resolve_onnx_device(config.device) if onnx else resolve_device(config.device, loaded.module, world.local_rank)
    kernel, kernel_warning = ("torch", None) if onnx else _resolve_kernel(config.stats_kernel, dev)
    # Where NaN/Inf handling is deferred (accelerators) a poisoned run is measured again; a one-pass
    # iterable cannot be, so it gets the NaN-safe statistics from the start.
    recorder = SiteRecorder(unit_axis=config.unit_axis, gradients=config.gradients and not onnx,
                            percentiles=config.percentiles, masked=not source.replayable and defers_nonfinite(dev),
                            kernel=kernel)
    run = _Run(config, source, recorder, dev, world, progress if world.is_main else None)
    if source.synthetic:
        run.warnings.append(SYNTHETIC_WARNING)
    if kernel_warning is not None:
        run.warnings.append(kernel_warning)
    run.kept_warnings = len(run.warnings)
    if on_start is not None and world.is_main:
        on_start(source.planned_samples(config.max_samples))
    init(world, dev)
    try:
        gradient_flow = _measure_onnx(loaded, run) if onnx else _measure_torch_exactly(loaded, run)
    finally:
        shutdown(world)
        release_chunk_buffers()
    if run.samples == 0:
        raise InputError(f"calibration data {source.description} yielded no samples; give at least one sample")
    if len(run.recorder) == 0:
        run.warnings.append("no ReLU-family activation was called during the forward pass; nothing to analyse")

    thresholds = Thresholds(rare=config.rare_threshold, dormant_tau=config.dormant_tau)
    layers = [build_layer(info, host, thresholds, hard_zero=act.hard_zero, upper=act.upper)
              for info, act, host in run.recorder.host_view()]
    for layer, gradient in zip(layers, run.recorder.gradient_view()):
        if gradient is not None:
            layer["gradient"] = gradient
    return Report(
        tool={"name": "reluscope", "version": __version__},
        model={"path": loaded.path, "format": loaded.format, "sha256": loaded.sha256},
        data={"source": source.description, "samples": run.samples, "synthetic": source.synthetic},
        run={"backend": "onnxruntime" if onnx else "torch", "device": str(dev), "processes": world.size,
             "seconds": round(time.perf_counter() - started, 4),
             "rare_threshold": config.rare_threshold, "dormant_tau": config.dormant_tau,
             "batch_size": run.config.batch_size, **({} if onnx else {"stats_kernel": kernel})},
        layers=layers,
        summary=build_summary(layers),
        warnings=run.warnings,
        unanalysed=run.unanalysed,
        gradient_flow=gradient_flow,
    )


@dataclass
class _Run:
    """What one analysis threads through its measuring loop."""

    config: AnalyzeConfig
    source: Any
    recorder: Any
    device: Any
    world: Any
    progress: ProgressCallback | None
    samples: int = 0
    warnings: list[str] = field(default_factory=list)
    unanalysed: list[dict[str, str]] = field(default_factory=list)
    kept_warnings: int = 0  # warnings from before the measuring loop, which a restart keeps

    def restart(self, **recorder_changes: Any) -> None:
        """Forget what the measuring loop gathered, to measure again from the first batch."""
        self.recorder = self.recorder.fresh(**recorder_changes)
        self.samples = 0
        self.unanalysed.clear()
        del self.warnings[self.kept_warnings:]

    def batches(self) -> Iterator[Any]:
        owns = self.world.owns if self.world.active else None
        for batch in self.source.batches(self.config.batch_size, self.config.max_samples, owns=owns):
            yield batch
            self.samples += batch.size
            if self.progress is not None:
                self.progress(batch.size * self.world.size)

    def merge_ranks(self) -> None:
        """Under torchrun: sum/min/max every accumulator over the ranks (a no-op otherwise)."""
        if self.world.active:
            from .distributed import all_reduce_int

            self.samples = all_reduce_int(self.samples, self.device)
            self.recorder.all_reduce()


def _resolve_kernel(requested: str, device: Any) -> tuple[str, str | None]:
    """The statistics route ("triton" or "torch") and a warning when auto had to give up Triton."""
    from .measure.stats import fused_module, resolve_kernel

    try:
        kernel = resolve_kernel(requested, device)
    except ValueError as exc:
        raise UsageError(f"--stats-kernel triton: {exc}; use --stats-kernel auto or torch") from None
    if kernel == "triton":
        problem = fused_module().self_check(device)
        if problem is not None:
            if requested == "triton":
                raise UsageError(f"--stats-kernel triton: {problem}; use --stats-kernel torch")
            return "torch", f"{problem}; site statistics were computed with PyTorch instead"
    return kernel, None


def _load(model: Any, config: AnalyzeConfig) -> Any:
    import torch

    from .backends import LoadedModel, load_model

    if isinstance(model, (str, Path)):
        return load_model(model, arch=config.arch, trust_checkpoint=config.trust_checkpoint)
    if isinstance(model, torch.nn.Module):
        return LoadedModel(model, "torchscript" if isinstance(model, torch.jit.ScriptModule) else "torch-module")
    raise UsageError(f"model must be a path or a torch.nn.Module, not {type(model).__name__}")


def _measure_torch_exactly(loaded: Any, run: _Run) -> dict[str, Any] | None:
    """Measure; if a deferred NaN/Inf check fired (accelerators only), measure again NaN-safely."""
    flow = _measure_with_oom_retry(loaded, run)
    if not run.recorder.masked and run.recorder.poisoned():
        run.restart(masked=True)
        flow = _measure_with_oom_retry(loaded, run)
    return flow


def _measure_with_oom_retry(loaded: Any, run: _Run) -> dict[str, Any] | None:
    """On CUDA out-of-memory, start over with half the batch size (statistics of a batch that
    failed midway cannot be taken back, so the run restarts rather than resumes)."""
    import torch

    while True:
        try:
            return _measure_torch(loaded, run)
        except ModelRunError as exc:
            if not isinstance(exc.__cause__, torch.cuda.OutOfMemoryError):
                raise
            if run.config.batch_size <= 1 or not run.source.rebatchable or run.world.active:
                raise ModelRunError(f"CUDA ran out of memory at batch size {run.config.batch_size}; pass a smaller "
                                    "--batch-size or --device cpu") from exc
            smaller = run.config.batch_size // 2
            note = f"CUDA ran out of memory at batch size {run.config.batch_size}; restarted with batch size {smaller}"
            torch.cuda.empty_cache()
            run.config = dataclasses.replace(run.config, batch_size=smaller)
            run.restart()
            run.warnings.append(note)
            run.kept_warnings = len(run.warnings)


def _measure_onnx(loaded: Any, run: _Run) -> dict[str, Any] | None:
    from .backends.onnx.session import OnnxCapture

    capture = OnnxCapture(loaded.module, run.recorder, device=str(run.device), path=loaded.path)
    with capture:
        for batch in run.batches():
            _forward(capture, batch.inputs, run.samples)
    run.unanalysed.extend(capture.unanalysed)
    run.warnings.extend(capture.warnings)
    if run.config.gradients:
        run.warnings.append(ONNX_GRADIENTS)
        return {"available": False, "reason": ONNX_GRADIENTS}
    return None


def _measure_torch(loaded: Any, run: _Run) -> dict[str, Any] | None:
    import torch

    from .backends.torch.gradients import ParameterGradients, trainable

    gradients = run.config.gradients
    with prepared_module(loaded.module, run.device) as module:
        capture = _torch_capture(loaded, module, run.recorder)
        run.unanalysed.extend(getattr(capture, "unreachable", []))
        named = capture.named_parameters() if hasattr(capture, "named_parameters") else list(module.named_parameters())
        grad_context = trainable(named) if gradients else contextlib.nullcontext(named)
        cast = input_caster(module, run.warnings)
        with grad_context as floating, (torch.enable_grad() if gradients else torch.inference_mode()), capture:
            parameter_grads = ParameterGradients.of(floating, run.device) if gradients else None
            for batch in run.batches():
                output = _forward(capture, cast(_to_device(batch.inputs, run.device)), run.samples, module)
                if parameter_grads is not None:
                    _backward(parameter_grads, output, batch.labels, run)
                del output  # releases this batch's autograd graph before the next forward
        run.merge_ranks()
        if parameter_grads is None:
            return None
        if run.world.active:
            parameter_grads.all_reduce()
        return {"available": True, **parameter_grads.to_dict()} if parameter_grads.batches else None


def _forward(capture: Any, inputs: Any, seen: int, module: Any = None) -> Any:
    try:
        return capture.run(inputs)
    except ReluscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own code raised
        shapes = [tuple(v.shape) for v in (inputs.values() if isinstance(inputs, dict) else inputs)
                  if hasattr(v, "shape")]
        given = ", ".join(f"{k}={tuple(v.shape)}" for k, v in inputs.items()) if isinstance(inputs, dict) else \
            ", ".join(str(shape) for shape in shapes)
        hint = expectation(module, shapes) if module is not None and not isinstance(inputs, dict) else None
        raise ModelRunError(f"the model's forward pass failed on the batch starting at sample {seen} "
                            f"(input shape {given}{'; ' + hint if hint else ''}): {error_line(exc)}. Check that "
                            "--data or --input-shape matches what the model expects") from exc


def _backward(parameter_grads: Any, output: Any, labels: Any, run: _Run) -> None:
    import torch

    try:
        parameter_grads.step(output, labels, run.config.loss)
    except ReluscopeError:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelRunError("CUDA ran out of memory in the backward pass") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. cross-entropy on labels outside the model's classes
        raise ModelRunError(f"the backward pass for --gradients (loss {parameter_grads.loss}) failed on the batch "
                            f"starting at sample {run.samples}: {error_line(exc)}. Check that the labels are class "
                            "indices the model's output has, or choose another --loss") from exc


def resolve_device(requested: str, module: Any = None, local_rank: int = 0) -> Any:
    """auto: a module's own accelerator, else CUDA when present (one GPU per torchrun rank), else CPU."""
    import torch

    requested = requested.lower()
    if requested == "auto":
        if module is not None and isinstance(module, torch.nn.Module):
            param = next(iter(module.parameters()), None)
            if param is not None and param.device.type != "cpu":
                return param.device
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and local_rank and torch.cuda.is_available():
        requested = f"cuda:{local_rank % torch.cuda.device_count()}"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: no CUDA GPU is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def resolve_onnx_device(requested: str) -> Any:
    """auto for ONNX: CUDA only when onnxruntime itself has its CUDA provider (onnxruntime-gpu)."""
    import torch

    if requested.lower() == "auto":
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return torch.device("cuda" if has_cuda else "cpu")
    return resolve_device(requested)


@contextlib.contextmanager
def prepared_module(module: Any, device: Any) -> Iterator[Any]:
    """Eval mode on the analysis device; afterwards every module's train flag and the device are restored."""
    training = {m: m.training for m in module.modules()}
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    original_device = first.device if first is not None else None
    moved = original_device is not None and original_device != device
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(NotImplementedError):  # exported GraphModules refuse .eval() in some versions
                module.eval()
        if moved:
            module.to(device)
        yield module
    finally:
        if moved:
            module.to(original_device)
        for sub, flag in training.items():
            sub.training = flag


def _torch_capture(loaded: Any, module: Any, recorder: Any) -> Any:
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        from .backends.torch.torchscript import ScriptCapture

        return ScriptCapture(module, recorder)
    from .backends.torch.capture import TorchCapture

    return TorchCapture(module, recorder, plan=loaded.export_plan)


def _to_device(inputs: Any, device: Any) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return tuple(v.to(device, non_blocking=True) for v in inputs)
