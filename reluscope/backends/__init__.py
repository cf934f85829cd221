"""Backends: detect a model file's format from its content and load it lazily."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import check_readable_file, sha256_of

FORMATS = ("torch-state-dict", "torchscript", "torch-export", "torch-pickle", "onnx")


@dataclass
class LoadedModel:
    module: Any  # nn.Module, ScriptModule, GraphModule or an onnx ModelProto
    format: str
    path: str | None = None
    sha256: str | None = None
    export_plan: list[tuple[str, str]] | None = None  # site names of a flattened exported graph
    notes: list[str] = field(default_factory=list)


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
        from .onnx.graph import load_onnx

        loaded = load_onnx(path)
    else:
        from .torch.load import load_torch

        loaded = load_torch(path, kind, arch=arch, trust_checkpoint=trust_checkpoint)
    loaded.path = str(path)
    loaded.sha256 = sha256_of(path)
    return loaded
