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
import re
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
from .weight_files import index_beside, looks_like_safetensors, read_index, read_safetensors, shard_of



def load_torch(path: Path, kind: str, *, arch: str | None, trust_checkpoint: bool) -> LoadedModel:
    if kind == "torchscript":
        return _load_torchscript(path, trust_checkpoint=trust_checkpoint)
    if kind == "torch-export":
        return _load_export(path, trust_checkpoint=trust_checkpoint)
    if kind == "safetensors":
        return _load_safetensors(path, arch=arch)
    if kind == "weight-index":
        return load_state_dict_file(path, read_index(path, _read_shard), arch=arch, kind="torch-state-dict")
    return _load_checkpoint(path, arch=arch, trust_checkpoint=trust_checkpoint)


def _load_safetensors(path: Path, *, arch: str | None) -> LoadedModel:
    """A .safetensors file (data only, whatever --trust-checkpoint says); a shard of a sharded checkpoint
    brings the others through the index file beside it."""
    shard = shard_of(path)
    if shard is not None:
        index = index_beside(path)
        if index is None:
            raise InputError(f"{path} is shard {shard[0]} of {shard[1]} of a sharded checkpoint and no index file "
                             "beside it lists it; give the index (model.safetensors.index.json) with every shard "
                             "beside it")
        loaded = load_state_dict_file(path, read_index(index, _read_shard), arch=arch)
        loaded.notes.append(f"{path.name} is one shard: analysing all {shard[1]} shards listed in {index.name}")
        return loaded
    return load_state_dict_file(path, read_safetensors(path), arch=arch)


def _read_shard(path: Path) -> Mapping[str, torch.Tensor]:
    """One shard of an index: .safetensors, or a torch.save file read weights-only (never unpickling code)."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if looks_like_safetensors(head, path.stat().st_size):
        return read_safetensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe, detail = unpickling_refused(exc)
        if unsafe:
            raise UnsafeCheckpointError(f"refused to load shard {path}: it holds pickled Python objects beyond "
                                        "weights, and unpickling them runs code from the file; shards are read as "
                                        "weights only") from exc
        raise InputError(f"cannot read shard {path}: it is not a readable pickle ({detail}); re-save it") from exc
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read shard {path}: {_damage(exc)}; the file may be damaged or truncated") from exc
    found = find_state_dict(obj)
    if found is None:
        raise InputError(f"shard {path} holds no weights (a mapping of names to tensors)")
    return found



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




def _load_export(path: Path, *, trust_checkpoint: bool) -> LoadedModel:
    from .capture import export_site_plan

    # torch.export.load runs code from the archive in many ways (pt2_check.py lists them).
    # Unless trusted, the archive is checked before torch reads it, and every torch.load inside
    # is forced to weights_only as a second line.
    try:
        with _EXPORT_LOAD_LOCK, torch_export_logs() as logged, \
                contextlib.nullcontext() if trust_checkpoint else _weights_only_loads():
            if not trust_checkpoint:
                check_pt2(path)
            program = torch.export.load(str(path))
            module = program.module()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not trust_checkpoint and _is_weights_only_refusal(exc):
            raise UnsafeCheckpointError(PICKLE_REFUSAL.format(path=path, what=" (in a torch.export archive)")) from exc
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
def torch_export_logs() -> Iterator[list[logging.LogRecord]]:
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
    if arch is None and isinstance(obj, Mapping):
        module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
        if module is not None:  # a trusted {"model": nn.Module, "epoch": ...}
            return LoadedModel(module, "torch-pickle")
    return load_state_dict_file(path, obj, arch=arch)


def _load_trusted(path: Path) -> Any:
    try:
        with _importable_from(path.parent):  # the model's class may live in a module beside it
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        if "__main__" in str(exc):
            raise InputError(f"cannot unpickle {path}: its model class was defined in the training script's "
                             "__main__, which is not importable here; save model.state_dict() and pass --arch "
                             "FILE.py:FACTORY, or define the class in a module beside the model") from exc
        raise InputError(f"cannot unpickle {path} even with --trust-checkpoint: {first_line(exc)} "
                         "(is the module that defines the model's class importable?)") from exc


def load_state_dict_file(path: Path, obj: Any, *, arch: str | None, kind: str = "torch-state-dict") -> LoadedModel:
    """The --arch model with the weights found in `obj` (a state_dict, or a training checkpoint holding one)."""
    candidates = list(state_dict_candidates(obj))
    if not candidates:
        raise InputError(f"{path} holds a {type(obj).__name__} with no state_dict (a mapping of names to tensors) "
                         "in it; save model.state_dict() or the whole model")
    if arch is None:
        raise UsageError(f"{path} is a state_dict: pass --arch FILE.py:FACTORY (or package.module:FACTORY) "
                         "naming a function that builds the untrained model")
    with _importable_from(path.parent):
        model = build_from_factory(arch)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    matches = sorted((_match(where, sd, expected) for where, sd in candidates),
                     key=lambda m: (-m.score, -m.named, _preference(m.where)))
    best = matches[0]
    loaded = LoadedModel(model, kind)
    equal = [m.where for m in matches[1:] if m.score == best.score and best.score]
    if equal:
        loaded.notes.append(f"{path} holds several weight sets that fit the --arch model ({', '.join([best.where, *equal])}); "
                            f"analysing {best.where}")
    if isinstance(obj, Mapping) and PRUNED_KEY in obj:
        adopt_pruned_shapes(model, best.weights)
    _load_weights(model, best, path)
    return loaded


# The key `reluscope prune -o FILE.pt` marks its state_dicts with (its value: the version that pruned it).
PRUNED_KEY = "reluscope_pruned"


def adopt_pruned_shapes(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Resize `model`'s layers to the shapes of a pruned state_dict of the same architecture: each tensor
    takes the saved shape, and the layer's size attributes follow (so its forward and repr agree)."""
    owners = dict(model.named_modules())
    for key, value in weights.items():
        owner_name, _, attr = key.rpartition(".")
        owner = owners.get(owner_name)
        current = getattr(owner, attr, None) if owner is not None else None
        if not isinstance(current, torch.Tensor) or tuple(current.shape) == tuple(value.shape):
            continue
        fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            setattr(owner, attr, fresh)
    for module in model.modules():
        _sizes_from_weights(module)


def _sizes_from_weights(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        first, second = weight.shape[0], weight.shape[1]
        if module.transposed:  # [in, out / groups, ...]
            if depthwise:
                module.groups = first
            module.in_channels, module.out_channels = first, second * module.groups
        else:  # [out, in / groups, ...]
            if depthwise:
                module.groups = first
            module.out_channels, module.in_channels = first, second * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        sized = weight if weight is not None else getattr(module, "running_mean", None)
        if sized is not None:
            module.num_features = sized.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)


# Where training code keeps its weights, most usual first: breaks ties between weight sets that fit
# equally well (an EMA copy beside the trained weights).
_PREFERRED_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "module", "weights",
                   "params", "ema", "model_ema", "ema_state_dict")
_ORIG_MOD = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper, anywhere in a name


def state_dict_candidates(obj: Any, where: str = "", depth: int = 0) -> Iterator[tuple[str, Mapping[str, torch.Tensor]]]:
    """Every mapping of names to tensors in `obj`, under any key (a Lightning .ckpt's "state_dict",
    "model_state", "ema"...), with where it was found."""
    if isinstance(obj, Mapping) and obj:
        if all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            yield (where or "the file's top level"), obj
            return
        if depth < 4:
            for key, value in obj.items():
                yield from state_dict_candidates(value, f"{where or 'checkpoint'}[{key!r}]", depth + 1)


def _preference(where: str) -> int:
    key = where.rsplit("[", 1)[-1].strip("]'\"") if "[" in where else ""
    return _PREFERRED_KEYS.index(key) if key in _PREFERRED_KEYS else len(_PREFERRED_KEYS)


class _Match:
    """A weight set mapped onto the model's names: prefixes stripped (or added) as they match best."""

    def __init__(self, where: str, weights: dict[str, torch.Tensor], outside: int, score: int, named: int,
                 how: str) -> None:
        self.where, self.weights, self.outside, self.score, self.named, self.how = \
            where, weights, outside, score, named, how


def _match(where: str, sd: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> _Match:
    """Map `sd`'s names onto `expected`'s: `_orig_mod.` dropped anywhere, then the one name prefix to strip
    (`module.`, `model.`, a Lightning module's attribute...) or to add that matches the most weights."""
    names = {_ORIG_MOD.sub(r"\1", key): value for key, value in sd.items()}
    strip: dict[str, int] = {}
    for key in names:
        for cut in _cuts(key):
            if key[cut:] in expected:
                strip[key[:cut]] = strip.get(key[:cut], 0) + 1
    add: dict[str, int] = {}
    for key in expected:
        for cut in _cuts(key):
            if cut and key[cut:] in names:
                add[key[:cut]] = add.get(key[:cut], 0) + 1
    options = [(count, -len(prefix), "strip", prefix) for prefix, count in strip.items()]
    options += [(count, -len(prefix), "add", prefix) for prefix, count in add.items()]
    _, _, how, prefix = max(options, default=(0, 0, "strip", ""))
    if how == "add":
        weights, outside = {prefix + key: value for key, value in names.items()}, 0
    else:
        weights = {key[len(prefix):]: value for key, value in names.items() if key.startswith(prefix)}
        outside = len(names) - len(weights)
    named = sum(1 for key in weights if key in expected)
    score = sum(1 for key, value in weights.items() if expected.get(key) == tuple(value.shape))
    return _Match(where, weights, outside, score, named, f"{how} {prefix!r}" if prefix else "as saved")


def _cuts(key: str) -> list[int]:
    """Where a name may be cut into prefix + rest: its start and after each dot."""
    return [0] + [i + 1 for i, char in enumerate(key) if char == "."]


def _load_weights(model: nn.Module, match: "_Match", path: Path) -> None:
    source = "" if match.where.startswith("the file") else f" (at {match.where})"
    try:
        result = model.load_state_dict(match.weights, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise InputError(f"the weights in {path}{source} do not fit the --arch model ({detail}): "
                         "check that --arch builds the same architecture") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}" + (" ..." if len(result.missing_keys) > 5 else ""))
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}"
                        + (" ..." if len(result.unexpected_keys) > 5 else ""))
    if problems:
        raise InputError(f"the weights in {path}{source} do not fit the --arch model ({'; '.join(problems)}): "
                         "check that --arch builds the same architecture")


def find_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The first mapping of names to tensors in `obj` (kept for callers; loading matches them all)."""
    return next((sd for _, sd in state_dict_candidates(obj)), None)


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """'path/to/file.py:factory' or 'package.module:factory' -> the callable."""
    if ":" not in spec:
        raise UsageError(f"--arch {spec!r} must look like FILE.py:FACTORY or package.module:FACTORY")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"--arch {spec!r} must look like FILE.py:FACTORY or package.module:FACTORY")
    if target.endswith(".py") or "/" in target or Path(target).is_file():
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
            with _importable_from(file.resolve().parent):  # as `python FILE.py` would: its folder first
                spec_obj.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code; sys.exit() there must not end reluscope
            sys.modules.pop(module_name, None)
            raise UsageError(f"importing --arch file {file} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    else:
        try:
            with _importable_from():
                module = importlib.import_module(target)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            raise UsageError(f"cannot import --arch module {target!r}: {first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        available = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise UsageError(f"--arch: {target} has no callable {attr!r} (callables there: {', '.join(available[:10])})")
    return factory


@contextlib.contextmanager
def _importable_from(*folders: Path) -> Iterator[None]:
    """Modules in `folders` (the model file's, an --arch file's) and in the current folder importable
    while the block runs, as for a user running `python` there: the console script `reluscope`, unlike
    `python -m`, does not put the current folder on sys.path."""
    added = []
    for folder in (*folders, Path.cwd()):
        entry = str(folder.resolve()) if str(folder) else str(Path.cwd())
        if entry not in sys.path and entry not in added:
            added.append(entry)
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            try:
                sys.path.remove(entry)
            except ValueError:
                pass


def build_from_factory(spec: str) -> nn.Module:
    factory = resolve_factory(spec)
    try:
        model = factory()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code; a sys.exit(1) would read as "gate failed"
        raise UsageError(f"--arch factory {spec} raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch factory {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
