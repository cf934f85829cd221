"""Where a torch run happens: the device it resolves to, and a module made ready on it and handed back."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from ...errors import UsageError


def resolve_device(requested: str, module: Any = None, local_rank: int = 0) -> Any:
    """auto: a module's own accelerator, else CUDA when present (one GPU per torchrun rank), else CPU."""
    requested = requested.lower()
    if requested == "auto":
        if module is not None and isinstance(module, torch.nn.Module):
            param = next(iter(module.parameters()), None)
            if param is not None and param.device.type != "cpu":
                return param.device
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and local_rank and torch.cuda.is_available():
        requested = f"cuda:{local_rank % torch.cuda.device_count()}"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"--device {requested}: torch does not accept it ({exc}); use auto, cpu, cuda or "
                         "cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: no CUDA GPU is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


@contextlib.contextmanager
def prepared_module(module: Any, device: Any) -> Iterator[Any]:
    """Eval mode on the analysis device; afterwards every module's mode (through its own `train()`) and the
    device are restored."""
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
        _restore_modes(module, training)


def _restore_modes(module: Any, training: dict[Any, bool]) -> None:
    """Put each module's train/eval mode back by calling its own `train(mode)`, not by setting the
    flag: a module whose `train()`/`eval()` do work (a LoRA adapter merges into the weights on
    `eval()` and unmerges on `train()`) is handed back as it came. Top-down: `train()` recurses into
    the children, so a child whose mode differs from its parent's is set after the parent."""
    for sub in module.modules():
        flag = training.get(sub)
        if flag is None or sub.training == flag:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                sub.train(flag)
            except NotImplementedError:  # exported GraphModules refuse .train() in some versions
                sub.training = flag
    for sub, flag in training.items():  # a train() that did not set its own flag
        sub.training = flag


def as_tensor(value: Any, device: Any) -> Any:
    """A batch's array (numpy, wrapped without a copy) or tensor, on `device`; None stays None."""
    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
    return tensor.to(device, non_blocking=True)


def to_device(inputs: Any, device: Any) -> Any:
    if isinstance(inputs, dict):
        return {k: as_tensor(v, device) for k, v in inputs.items()}
    return tuple(as_tensor(v, device) for v in inputs)

