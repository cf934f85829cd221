"""Writing payloads: atomically to a file (never a half-written report), or to stdout.

What `-o`/`--junit FILE` does depends on what FILE is now:
- nothing, or a regular file: the payload goes to a temporary file beside it, which is renamed
  over it (readers see all or nothing). A new file gets the mode the umask gives (0644 under
  umask 022); a replaced file keeps its mode.
- a character device (`/dev/null`, a terminal) or a FIFO: it is written as a stream, never
  replaced (as root, replacing `/dev/null` with a file would break the whole machine). A FIFO
  nobody reads is an error, not a hang.
- `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`: written as a stream to what that
  descriptor is (a terminal, a pipe, a file the shell opened), at its end.
- any other symbolic link: refused (exit 2). Writing through a link would touch a file the
  command line does not name, and replacing it would silently break it.
- a block device, socket or folder: refused.

`write_together` writes `-o` and `--junit` so that both land or neither does: each is staged in
full (written, flushed, synced) as a hidden temporary file beside its target before either is
renamed into place; a failed rename puts back what the earlier one replaced; a temporary file
never outlives the run, also when SIGINT or SIGTERM arrives (`on_signal` raises `Interrupted`,
and while the renames run it is held back until they are done).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import InputError, UsageError

_STREAM_LINK = re.compile(r"/(dev/(stdout|stderr|fd/[0-9]+)|proc/(self|[0-9]+)/fd/[0-9]+)\Z")


def _kind(path: Path) -> str:
    """'new', 'file', 'stream' (device, FIFO, std stream link), 'link', 'folder' or 'other'."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # the parent check says what is wrong
        return "new"
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}; choose another path") from exc
    if stat.S_ISLNK(st.st_mode):
        if _STREAM_LINK.match(os.path.abspath(path)) or _through_fd_link(path):
            return "stream"
        return "link"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream"
    return "other"


def _through_fd_link(path: Path) -> bool:
    """A link chain that passes through /proc/self/fd/N (as /dev/stdout does)."""
    current = os.path.abspath(path)
    for _ in range(40):
        if _STREAM_LINK.match(current):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.join(os.path.dirname(current), os.readlink(current))
        current = os.path.normpath(current)
    return False


def check_writable(path: Path) -> None:
    """Fail before the analysis, not after it, when the report could not be written."""
    kind = _kind(path)
    if kind == "folder":
        raise InputError(f"cannot write {path}: it is a folder; give a file path")
    if kind == "link":
        raise InputError(f"cannot write {path}: it is a symbolic link (to {os.readlink(path)}); reluscope neither "
                         "replaces links nor writes through them, give the path of the file itself")
    if kind == "other":
        raise InputError(f"cannot write {path}: it is a block device or socket, not a file; choose another path")
    if kind == "stream":
        if not os.access(path, os.W_OK):
            raise InputError(f"cannot write {path}: permission denied; choose another path")
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is not an existing folder; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: folder {parent} is not writable; choose another path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct_outputs(outputs: Mapping[str, Path | str | None], inputs: Mapping[str, Path | str | None]) -> None:
    """Refuse an output path that is one of the inputs (the report would overwrite the model, the
    data or a report being compared) or another output. Streams (/dev/null, a FIFO, /dev/stdout)
    are never overwritten, so they may repeat. `outputs` and `inputs` map an option name
    ('-o', '--data', 'the model') to its path; None means not given."""
    seen: list[tuple[str, Path]] = []
    for option, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        if _kind(path) == "stream":
            continue
        for name, source in inputs.items():
            if isinstance(source, str) and ":" in source and source.rpartition(":")[0].endswith(".py"):
                source = source.rpartition(":")[0]  # --arch FILE.py:FACTORY
            if source is not None and _same_file(path, Path(source)):
                raise UsageError(f"{option} {path} is {name} ({source}): the report would overwrite it; choose "
                                 "another output path")
        for other, earlier in seen:
            if _same_file(path, earlier):
                raise UsageError(f"{option} {path} is the same file as {other} {earlier}: one would overwrite the "
                                 "other; give them different paths")
        seen.append((option, path))


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it straight back)
    os.umask(mask)
    return mask


def _write_stream(path: Path, text: str | bytes) -> None:
    """Write into a device, FIFO or standard stream: never create, truncate or replace it."""
    flags = os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == 6:  # ENXIO: a FIFO nobody has open for reading
            raise InputError(f"cannot write {path}: it is a pipe that no process reads; start the reader first or "
                             "choose a file") from exc
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            raise InputError(f"cannot write {path}: it is a block device or folder, not a stream")
        os.set_blocking(fd, True)
        if stat.S_ISREG(st.st_mode):  # /dev/stdout redirected to a file: add to its end
            os.lseek(fd, 0, os.SEEK_END)
        data = text.encode("utf-8") if isinstance(text, str) else text
        while data:
            written = os.write(fd, data)
            data = data[written:]
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- signals
class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM arrived; the CLI exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_held = 0  # > 0 while renames run: a signal then waits for them
_pending: list[int] = []


def on_signal(signum: int, frame: Any = None) -> None:
    """The CLI's SIGINT/SIGTERM handler: raise `Interrupted`, unless renames are under way."""
    if _held:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while the block runs (the
    previous handlers come back after it). Elsewhere than the main thread: nothing changes."""
    wanted = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {signum: signal.signal(signum, on_signal) for signum in wanted}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- writing
def _stage(path: Path, text: str | bytes, kind: str) -> str:
    """The whole text (or bytes) in a hidden temporary file beside `path`, synced to disk; its name."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) if kind == "file" else 0o666 & ~_umask()
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _commit(staged: Sequence[tuple[str, Path]]) -> None:
    """Rename each staged file over its target; when one fails, the earlier ones are undone."""
    done: list[tuple[Path, str | None]] = []  # target, a hard link to what it replaced (None: it was new)
    try:
        for tmp, path in staged:
            kind = _kind(path)
            if kind not in ("new", "file"):  # became a link or device meanwhile: never replace it
                raise InputError(f"cannot write {path}: it changed into a link or special file while reluscope ran")
            backup = None
            if kind == "file" and len(staged) > 1:
                backup = f"{tmp}.old"
                os.link(path, backup)
            try:
                os.replace(tmp, path)
            except BaseException:
                if backup is not None:
                    Path(backup).unlink(missing_ok=True)
                raise
            done.append((path, backup))
    except BaseException as exc:
        for path, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is None:
                    path.unlink()
                else:
                    os.replace(backup, path)
        if isinstance(exc, OSError):
            failed = staged[len(done)][1]
            raise InputError(f"cannot write {failed}: {exc.strerror}; nothing was written") from exc
        raise
    finally:
        for _, backup in done:
            if backup is not None:
                Path(backup).unlink(missing_ok=True)


def write_together(outputs: Sequence[tuple[Path, str | bytes]]) -> None:
    """Write each (path, text or bytes): files land all together or none does (see the module's doc);
    devices, FIFOs and standard streams are written after the files, as streams."""
    for path, _ in outputs:
        check_writable(path)
    kinds = [(path, text, _kind(path)) for path, text in outputs]
    staged: list[tuple[str, Path]] = []
    try:
        for path, text, kind in kinds:
            if kind != "stream":
                staged.append((_stage(path, text, kind), path))
        with _signals_held():
            _commit(staged)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)  # renamed: gone already
    for path, text, kind in kinds:
        if kind == "stream":
            _write_stream(path, text)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers see all or nothing.
    A device, FIFO or standard stream is written as a stream instead (see the module's doc)."""
    write_together([(path, text)])


def emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    else:
        write_atomic(output, text if text.endswith("\n") else text + "\n")
