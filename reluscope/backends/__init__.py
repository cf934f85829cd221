"""Backends: pick the one that runs a model (from a file's content, never its name) and load it.

`open_model` is all the wiring needs: it returns a `Backend` (base.py) holding the loaded model.
Each backend lives in its own package (torch/, onnx/) and is imported only when a model needs it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError
from ..files import check_readable_file, looks_like_safetensors, sha256_of
from .base import Backend, LoadedModel

FORMATS = ("torch-state-dict", "torchscript", "torch-export", "torch-pickle", "onnx", "huggingface")


def detect_format(path: Path) -> str:
    """The model format from the file's bytes, never from its extension (a folder: a Hugging Face
    model folder, from its config.json)."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf-folder"
        raise InputError(f"model path is a folder without a config.json: {path}; give the model file inside it, or a "
                         "Hugging Face model folder (config.json, weights and tokenizer files)")
    check_readable_file(path)
    with path.open("rb") as handle:
        head = handle.read(16)
    if looks_like_safetensors(head, path.stat().st_size):
        return "safetensors"
    if head.lstrip()[:1] == b"{" and _is_weight_index(path):
        return "weight-index"
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


def _is_weight_index(path: Path) -> bool:
    """A sharded checkpoint's index: JSON with a "weight_map" (model.safetensors.index.json)."""
    import json

    if path.stat().st_size > 64 * 1024 * 1024:
        return False
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")).get("weight_map"), dict)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def load_model(path: str | Path, *, arch: str | None = None, trust_checkpoint: bool = False) -> LoadedModel:
    path = Path(path)
    kind = detect_format(path)
    if kind == "onnx-candidate":
        from .onnx.graph import load_onnx

        loaded = load_onnx(path)
    elif kind == "hf-folder":
        from .torch.hf import load_hf_folder

        loaded = load_hf_folder(path, trust_checkpoint=trust_checkpoint)
    else:
        from .torch.load import load_torch

        loaded = load_torch(path, kind, arch=arch, trust_checkpoint=trust_checkpoint)
    loaded.path = str(path)
    if loaded.sha256 is None:
        loaded.sha256 = sha256_of(path)
    return loaded


def open_model(model: Any, *, arch: str | None = None, trust_checkpoint: bool = False) -> Backend:
    """The backend for `model`: a path (format detected from its bytes), an `nn.Module`, or a
    Backend already built (e.g. with a chosen NaN/Inf policy), which is returned as it is."""
    if isinstance(model, Backend):
        return model
    if isinstance(model, (str, Path)):
        loaded = load_model(model, arch=arch, trust_checkpoint=trust_checkpoint)
        if loaded.format == "onnx":
            from .onnx.backend import OnnxBackend

            return OnnxBackend(loaded)
        from .torch.backend import TorchBackend

        return TorchBackend(loaded)
    import torch

    if isinstance(model, torch.nn.Module):
        from .torch.backend import TorchBackend

        return TorchBackend.of_module(model)
    raise UsageError(f"model must be a path or a torch.nn.Module, not {type(model).__name__}")
