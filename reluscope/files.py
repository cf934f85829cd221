"""Checks and digests of the files a user names (models and calibration data alike)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from .errors import InputError


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


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file's first bytes are a safetensors header: a little-endian u64 length that fits the
    file, then the JSON header's '{'."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"
