"""PyTorch formats: state_dict + architecture factory, TorchScript, torch.export, pickled module.

Without --trust-checkpoint a model file is data, and nothing in it runs:
- checkpoints load with `weights_only=True`; one that needs pickled code is refused;
- a torch.export archive (.pt2) is checked before torch reads it (pt2_check.py): only the
  exported-program layout, raw tensor weights, and a graph of allow-listed pure tensor ops;
- a TorchScript file is a program (its `__setstate__` runs inside torch.jit.load, its code in the
  forward pass), so it is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import pickle
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ...errors import InputError, UnsafeCheckpointError, UsageError, first_line
from ..base import LoadedModel
from ...files import unpickling_refused
from .pt2_check import PICKLE_REFUSAL, check_pt2

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def load_torch(path: Path, kind: str, *, arch: str | None, trust_checkpoint: bool) -> LoadedModel:
    if kind == "torchscript":
        return _load_torchscript(path, trust_checkpoint=trust_checkpoint)
    if kind == "torch-export":
        return _load_export(path, trust_checkpoint=trust_checkpoint)
    return _load_checkpoint(path, arch=arch, trust_checkpoint=trust_checkpoint)



def _damage(exc: BaseException) -> str:
    """What a reader said about a damaged file (str(KeyError('36')) alone would read '36')."""
    detail = f"no record {exc.args[0]!r} in it" if isinstance(exc, KeyError) and exc.args else first_line(exc)
    return detail.rstrip(".:")


_TORCHSCRIPT_REFUSAL = ("refused to load {path}: a TorchScript file is a program, and loading it runs its code "
                        "(its __setstate__ methods run inside torch.jit.load, its forward can read and write files). "
                        "Pass --trust-checkpoint only if you trust its source, or export the model with "
                        "torch.export (.pt2) or to ONNX")


def _load_torchscript(path: Path, *, trust_checkpoint: bool) -> LoadedModel:
    if not trust_checkpoint:
        raise UnsafeCheckpointError(_TORCHSCRIPT_REFUSAL.format(path=path))
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError for every kind of damage
        raise InputError(f"cannot load TorchScript file {path}: {_damage(exc)}; the file may be damaged or "
                         "truncated, re-save it") from exc
    return LoadedModel(module, "torchscript")


_UNSAFE_REFUSAL = PICKLE_REFUSAL


def _load_export(path: Path, *, trust_checkpoint: bool) -> LoadedModel:
    from .capture import export_site_plan

    # torch.export.load runs code from the archive in many ways (pt2_check.py lists them).
    # Unless trusted, the archive is checked before torch reads it, and every torch.load inside
    # is forced to weights_only as a second line.
    try:
        with _EXPORT_LOAD_LOCK, _torch_export_logs() as logged, \
                contextlib.nullcontext() if trust_checkpoint else _weights_only_loads():
            if not trust_checkpoint:
                check_pt2(path)
            program = torch.export.load(str(path))
            module = program.module()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not trust_checkpoint and _is_weights_only_refusal(exc):
            raise UnsafeCheckpointError(_UNSAFE_REFUSAL.format(path=path, what=" (in a torch.export archive)")) from exc
        # torch.export.load logs the real error ("check the warnings above") and raises a generic one
        cause = next((r.exc_info[1] for r in reversed(logged) if r.exc_info and r.exc_info[1]), exc)
        detail = first_line(cause).rstrip(".")
        raise InputError(f"cannot load torch.export archive {path}: {detail}; re-export the model") from cause
    return LoadedModel(module, "torch-export", export_plan=export_site_plan(module))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _torch_export_logs() -> Iterator[list[logging.LogRecord]]:
    """torch.export's log records kept instead of printed: with no logging configured, Python prints
    them to stderr, tracebacks included, and a bad input must end in one line."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]  # torch attaches its own handlers
    for logger in loggers:
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield handler.records
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers = handlers
            logger.propagate = propagate


def _refuse_opaque_objects(path: Path) -> None:
    """Kept for callers of the old name: the whole pre-load check of a .pt2 (pt2_check.py)."""
    check_pt2(path)


# One torch.export.load at a time. It is not thread-safe itself (in torch 2.13 a second load
# fails with "_CURRENT_DESERIALIZER is already set"), and two overlapping weights-only blocks
# would restore each other's saved environment: the first to finish would lift the switch while
# the other's untrusted load still runs.
_EXPORT_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load inside forced to weights_only=True, whatever its caller asks for (torch's
    documented TORCH_FORCE_WEIGHTS_ONLY_LOAD switch). The switch is process-wide while the block
    runs: a torch.load in another thread meanwhile is forced too, which fails safe. Run it under
    _EXPORT_LOAD_LOCK."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch.load
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_weights_only_refusal(exc: BaseException) -> bool:
    """Whether a forced weights_only load inside torch.export.load met a Python global (code)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError) or "Weights only load failed" in str(seen):
            return unpickling_refused(seen)[0]
        seen = seen.__cause__ or seen.__context__
    return False


def _load_checkpoint(path: Path, *, arch: str | None, trust_checkpoint: bool) -> LoadedModel:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe, detail = unpickling_refused(exc)
        if not unsafe:  # not code: bytes the unpickler cannot read at all
            raise InputError(f"cannot read checkpoint {path}: it is not a readable pickle ({detail}); the file is "
                             "damaged or truncated, re-save it") from exc
        if not trust_checkpoint:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it holds pickled Python objects beyond weights (e.g. a whole nn.Module), "
                "and unpickling them runs code from the file. Pass --trust-checkpoint only if you trust its source, "
                "or save a state_dict and pass --arch"
            ) from exc
        obj = _load_trusted(path)
    except Exception as exc:  # noqa: BLE001 - truncated zips, wrong magic numbers...
        raise InputError(f"cannot read checkpoint {path}: {_damage(exc)}; the file may be damaged or "
                         "truncated, re-save it") from exc
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "torch-pickle")
    state_dict = find_state_dict(obj)
    if state_dict is None:
        raise InputError(f"{path} holds a {type(obj).__name__} with no state_dict (a mapping of names to tensors) "
                         "in it; save model.state_dict() or the whole model")
    if arch is None:
        raise UsageError(f"{path} is a state_dict: pass --arch FILE.py:FACTORY (or package.module:FACTORY) "
                         "naming a function that builds the untrained model")
    model = build_from_factory(arch)
    _load_weights(model, state_dict, path)
    return LoadedModel(model, "torch-state-dict")


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot unpickle {path} even with --trust-checkpoint: {first_line(exc)} "
                         "(is the module that defines the model's class importable?)") from exc


def find_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """A mapping of names to tensors, at the top level or nested under a usual key."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if key in obj:
                found = find_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def _load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel/DDP
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise InputError(f"the weights in {path} do not fit the --arch model ({detail}): "
                         "check that --arch builds the same architecture") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}" + (" ..." if len(result.missing_keys) > 5 else ""))
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}"
                        + (" ..." if len(result.unexpected_keys) > 5 else ""))
    if problems:
        raise InputError(f"the weights in {path} do not fit the --arch model ({'; '.join(problems)}): "
                         "check that --arch builds the same architecture")


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """'path/to/file.py:factory' or 'package.module:factory' -> the callable."""
    if ":" not in spec:
        raise UsageError(f"--arch {spec!r} must look like FILE.py:FACTORY or package.module:FACTORY")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"--arch {spec!r} must look like FILE.py:FACTORY or package.module:FACTORY")
    if target.endswith(".py") or "/" in target or Path(target).exists():
        file = Path(target)
        if not file.is_file():
            raise UsageError(f"--arch file not found: {file}")
        module_name = f"reluscope_arch_{abs(hash(str(file.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(module_name, file)
        if spec_obj is None or spec_obj.loader is None:
            raise UsageError(f"--arch file {file} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module  # lets dataclasses/pickle inside the file find their module
        try:
            spec_obj.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code; sys.exit() there must not end reluscope
            sys.modules.pop(module_name, None)
            raise UsageError(f"importing --arch file {file} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            raise UsageError(f"cannot import --arch module {target!r}: {first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        available = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise UsageError(f"--arch: {target} has no callable {attr!r} (callables there: {', '.join(available[:10])})")
    return factory


def build_from_factory(spec: str) -> nn.Module:
    factory = resolve_factory(spec)
    try:
        model = factory()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code; a sys.exit(1) would read as "gate failed"
        raise UsageError(f"--arch factory {spec} raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch factory {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
