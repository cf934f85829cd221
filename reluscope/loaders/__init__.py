"""Model loaders: detect a file's format from its content and load it lazily."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

FORMATS = ("torch-state-dict", "torchscript", "torch-export", "torch-pickle", "onnx")


@dataclass
class LoadedModel:
    module: Any  # nn.Module, ScriptModule, GraphModule or an onnx ModelProto
    format: str
    path: str | None = None
    sha256: str | None = None
    export_plan: list[tuple[str, str]] | None = None  # site names of a flattened exported graph
    notes: list[str] = field(default_factory=list)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_readable_file(path: Path, what: str = "model", *, folder_ok: bool = False) -> None:
    """Refuse, with one line, anything but a readable, non-empty regular file (or a folder, if allowed)."""
    try:
        info = path.stat()  # follows symlinks; os.stat, not Path.exists(), which calls a symlink loop "missing"
    except FileNotFoundError as exc:
        raise InputError(f"{what} file not found: {path}; check the path") from exc
    except OSError as exc:  # a symlink loop (ELOOP), a path through a file (ENOTDIR), no permission...
        raise InputError(f"cannot read {what} file {path}: {exc.strerror}; check the path") from exc
    if stat.S_ISDIR(info.st_mode):
        if folder_ok:
            return
        raise InputError(f"{what} path is a folder, not a file: {path}; give the file inside it")
    if not stat.S_ISREG(info.st_mode):
        # open() on a FIFO blocks until a writer appears, and a device never ends: refuse before opening
        raise InputError(f"{what} path {path} is not a regular file (a pipe, socket or device); "
                         f"copy the {what} into a file first")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror}; check its permissions") from exc
    if info.st_size == 0:
        raise InputError(f"{what} file is empty: {path}; re-save or re-copy it")


def unpickling_refused(exc: BaseException) -> tuple[bool, str]:
    """Why torch.load(weights_only=True) raised: (True, what) when the pickle names a Python
    global it will not import (code or classes: the file is unsafe), (False, what) when it is
    not a pickle it can read at all (damage: an opcode it does not know, a truncated stream)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or line.startswith(("Unsupported", "WeightsUnpickler"))),
                  lines[-1] if lines else type(exc).__name__)
    detail = detail.removeprefix("WeightsUnpickler error: ").split(". ", 1)[0].rstrip(".")
    return "GLOBAL" in str(exc), detail


def detect_format(path: Path) -> str:
    """The model format from the file's bytes, never from its extension."""
    check_readable_file(path)
    with path.open("rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path} looks like a zip archive (torch.save, TorchScript or .pt2) but is damaged: "
                             f"{exc}; re-save the model") from exc
        if any(name.endswith("/archive_format") or "/models/" in name and name.endswith(".json") for name in names):
            return "torch-export"
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "torch-checkpoint"
        raise InputError(f"{path} is a zip archive but not a PyTorch checkpoint, TorchScript or torch.export file")
    if head[:1] == b"\x80":  # a pickle protocol marker: legacy (pre-1.6) torch.save format
        return "torch-checkpoint"
    return "onnx-candidate"


def load_model(path: str | Path, *, arch: str | None = None, trust_checkpoint: bool = False) -> LoadedModel:
    path = Path(path)
    kind = detect_format(path)
    if kind == "onnx-candidate":
        from .onnx import load_onnx

        loaded = load_onnx(path)
    else:
        from .torch import load_torch

        loaded = load_torch(path, kind, arch=arch, trust_checkpoint=trust_checkpoint)
    loaded.path = str(path)
    loaded.sha256 = sha256_of(path)
    return loaded
