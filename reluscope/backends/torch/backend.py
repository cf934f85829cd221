"""The torch backend's measuring: device, reduction route, torchrun shards, gradients, and the two
ways a run starts over (CUDA out of memory at a smaller batch; NaN/Inf found late, NaN-safely)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from ...distributed import World, init, shutdown, world_from_env
from ...errors import InputError, ModelRunError, ReluscopeError, UsageError, first_line
from ...measure.recorder import SiteRecorder
from ...measure.reductions import NonfinitePolicy
from ...run import Run
from ..base import Backend, LoadedModel, Measurement, PruneRequest, Pruning
from .capture import TorchCapture
from .session import TorchSession
from .torchscript import ScriptCapture
from .devices import as_tensor, prepared_module, resolve_device, to_device
from .gradients import ParameterGradients, trainable
from .inputs import fixed_batch_size, input_caster
from .routes import choose_reduction


class TorchBackend(Backend):
    """An `nn.Module`, exported GraphModule or ScriptModule, measured where it runs.

    `nonfinite` fixes the NaN/Inf policy (by default: checked per batch on the CPU, deferred to
    one read at the end on accelerators, NaN-safe from the start for one-pass data)."""

    name = "torch"

    def __init__(self, loaded: LoadedModel, *, nonfinite: NonfinitePolicy | None = None) -> None:
        super().__init__(loaded)
        self.nonfinite = nonfinite

    @classmethod
    def of_module(cls, module: torch.nn.Module, **options: Any) -> "TorchBackend":
        """A module handed in through the API (it goes back as it came)."""
        kind = "torchscript" if isinstance(module, torch.jit.ScriptModule) else "torch-module"
        return cls(LoadedModel(module, kind), **options)

    def _compiled(self) -> str | None:
        """What kind of compiled graph the model is (its layers are not modules to cut), or None."""
        if isinstance(self.loaded.module, torch.jit.ScriptModule):
            return "TorchScript"
        return "torch.export (.pt2)" if self.loaded.format == "torch-export" else None

    def check_prunable(self, suffix: str | None) -> None:
        compiled = self._compiled()
        if compiled is not None and suffix not in (None, ".onnx"):
            raise UsageError(f"a {compiled} model is pruned through its ONNX export, so the pruned model is ONNX: "
                             f"give -o a .onnx file (not {suffix}), or prune the PyTorch model it came from (a "
                             "state_dict with --arch) to write .pt or .pt2")

    def prune_through(self, batch: Any) -> tuple[bytes, str, str] | None:
        compiled = self._compiled()
        if compiled is None:
            return None
        from .prune import compiled_to_onnx

        return (compiled_to_onnx(self.loaded.module, batch), ".onnx",
                f"the {compiled} model was pruned through its ONNX export (the same sites, by name); the pruned "
                "model is ONNX")

    def prune(self, request: PruneRequest) -> Pruning:
        from .prune import prune_module

        return prune_module(self.loaded.module, request)

    def cost(self, model: Any, batch: Any) -> dict[str, Any]:
        from .prune import cost

        return cost(model, batch)

    def serialize(self, model: Any, suffix: str, batch: Any) -> bytes:
        from .prune import serialize

        return serialize(model, suffix, batch)

    def measure(self, run: Run) -> Measurement:
        config = run.config
        world = world_from_env()
        if not world.is_main:
            run.progress = None  # under torchrun, rank 0 alone shows progress (for every rank's batches)
        device = resolve_device(config.device, self.loaded.module, world.local_rank)
        replayable = run.source.replayable
        policy = self.nonfinite or NonfinitePolicy.for_device(device)
        if policy is NonfinitePolicy.DEFER and not replayable:
            policy = NonfinitePolicy.MASKED  # a one-pass iterable cannot be measured again
        reduction, warning = choose_reduction(config.stats_kernel, device, policy)
        if warning is not None:
            run.warnings.append(warning)
            run.keep_warnings()
        run.recorder = SiteRecorder(unit_axis=config.unit_axis, gradients=config.gradients,
                                    percentiles=config.percentiles, reduction=reduction)
        init(world, device)
        try:
            flow = self._measure_exactly(run, device, world)
        finally:
            shutdown(world)
        return Measurement(
            recorder=run.recorder,
            run={"backend": self.name, "device": str(device), "processes": world.size,
                 "batch_size": run.config.batch_size, "stats_kernel": reduction.name},
            gradient_flow=flow,
        )

    def _measure_exactly(self, run: Run, device: torch.device, world: World) -> dict[str, Any] | None:
        """Measure; if a deferred NaN/Inf flag fired, measure again NaN-safely."""
        flow = self._measure_with_oom_retry(run, device, world)
        reduction = run.recorder.reduction
        if reduction.nonfinite is NonfinitePolicy.DEFER and run.recorder.poisoned():
            run.restart(reduction=reduction.with_policy(NonfinitePolicy.MASKED))
            flow = self._measure_with_oom_retry(run, device, world)
        return flow

    def _measure_with_oom_retry(self, run: Run, device: torch.device, world: World) -> dict[str, Any] | None:
        """On CUDA out-of-memory, start over with half the batch size (statistics of a batch that
        failed midway cannot be taken back, so the run restarts rather than resumes)."""
        while True:
            try:
                return self._measure_once(run, device, world)
            except ModelRunError as exc:
                if not isinstance(exc.__cause__, torch.cuda.OutOfMemoryError):
                    raise
                size = run.config.batch_size
                if size <= 1 or not run.source.rebatchable or world.active:
                    raise ModelRunError(f"CUDA ran out of memory at batch size {size}; pass a smaller "
                                        "--batch-size or --device cpu") from exc
                torch.cuda.empty_cache()
                run.config = dataclasses.replace(run.config, batch_size=size // 2)
                run.restart()
                run.warnings.append(f"CUDA ran out of memory at batch size {size}; restarted with batch size "
                                    f"{size // 2}")
                run.keep_warnings()

    def _measure_once(self, run: Run, device: torch.device, world: World) -> dict[str, Any] | None:
        gradients = run.config.gradients
        with prepared_module(self.loaded.module, device) as module:
            session = _session_for(module, run.recorder, self.loaded.export_plan)
            run.unanalysed.extend(session.unanalysed)
            named = session.named_parameters()
            grad_context = trainable(named) if gradients else contextlib.nullcontext(named)
            cast = input_caster(module, run.warnings)
            with grad_context as floating, (torch.enable_grad() if gradients else torch.inference_mode()), session:
                parameter_grads = ParameterGradients.of(floating, device) if gradients else None
                owns = world.owns if world.active else None
                fixed = fixed_batch_size(module)
                for batch in run.batches(owns=owns, ranks=world.size):
                    inputs = cast(to_device(batch.inputs, device))
                    mask, labels = as_tensor(batch.mask, device), as_tensor(batch.labels, device)
                    for part, part_mask, labels, real in _fit_batch(inputs, mask, labels, batch.size, fixed,
                                                                    run, gradients):
                        with run.recorder.masked(part_mask, samples=real):
                            output = run.forward(session, part)
                        if parameter_grads is not None:
                            _backward(parameter_grads, output, labels, run)
                        del output  # releases this batch's autograd graph before the next forward
            for note in [*self.loaded.notes, *run.recorder.notes]:
                if note not in run.warnings:
                    run.warnings.append(note)
            if world.active:
                from ...distributed import all_reduce_int

                run.samples = all_reduce_int(run.samples, device)
                run.recorder.all_reduce()
            if parameter_grads is None:
                return None
            if world.active:
                parameter_grads.all_reduce()
            return {"available": True, **parameter_grads.to_dict()} if parameter_grads.batches else None


def _fit_batch(inputs: Any, mask: torch.Tensor | None, labels: Any, rows: int, fixed: int | None, run: Run,
               gradients: bool) -> Any:
    """(inputs, mask, labels, real rows) to feed: the batch as it is, or, for a graph exported with a fixed
    batch size, chunks of that size with the last one zero-padded and the padding masked out of the
    statistics (as the ONNX route does)."""
    if fixed is None or rows == fixed:
        yield inputs, mask, labels, None
        return
    if gradients and rows % fixed:
        raise InputError(f"the .pt2 model was exported with a fixed batch size of {fixed}; with --gradients the "
                         f"padding of a batch of {rows} would enter the loss: pass a --batch-size (and --max-samples, "
                         f"if any) that is a multiple of {fixed}")
    note = (f"the .pt2 model was exported with a fixed batch size of {fixed}: batches are fed in chunks of {fixed}, "
            "the last one zero-padded (padded rows are not measured)")
    if note not in run.warnings:
        run.warnings.append(note)
    for start in range(0, rows, fixed):
        real = min(fixed, rows - start)

        def part(tensor: torch.Tensor) -> torch.Tensor:
            piece = tensor[start:start + fixed]
            if real < fixed:
                piece = torch.cat([piece, piece.new_zeros((fixed - real, *piece.shape[1:]))])
            return piece

        parts = {k: part(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(map(part, inputs))
        if mask is not None:
            part_mask = part(mask)  # padded rows: no real token
        elif real < fixed:
            part_mask = torch.arange(fixed, device=parts_device(parts)) < real  # rows of the batch that are real
        else:
            part_mask = None
        yield parts, part_mask, None if labels is None else labels[start:start + real], real


def parts_device(parts: Any) -> torch.device:
    first = next(iter(parts.values())) if isinstance(parts, dict) else parts[0]
    return first.device


def _backward(parameter_grads: ParameterGradients, output: Any, labels: Any, run: Run) -> None:
    try:
        parameter_grads.step(output, labels, run.config.loss)
    except ReluscopeError:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelRunError("CUDA ran out of memory in the backward pass") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. cross-entropy on labels outside the model's classes
        raise ModelRunError(f"the backward pass for --gradients (loss {parameter_grads.loss}) failed on the batch "
                            f"starting at sample {run.samples}: {first_line(exc)}. Check that the labels are class "
                            "indices the model's output has, or choose another --loss") from exc


def _session_for(module: torch.nn.Module, recorder: SiteRecorder, plan: list[tuple[str, str]] | None) -> TorchSession:
    """The capture that reaches `module`'s sites: a graph rewrite for TorchScript (hooks and modes do not
    reach inside it), a TorchFunctionMode with a module stack otherwise."""
    if isinstance(module, torch.jit.ScriptModule):
        return ScriptCapture(module, recorder)
    return TorchCapture(module, recorder, plan=plan)
