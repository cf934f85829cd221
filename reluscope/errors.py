"""Domain errors, each mapped to one of the exit codes of the CLI contract.

The CLI turns these into one line on stderr (no traceback unless --debug).
"""

import re

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class ReluscopeError(Exception):
    """Base class: a problem the user can act on. `exit_code` follows the exit-code table in README.md."""

    exit_code = EXIT_USAGE


class UsageError(ReluscopeError):
    """Bad option values or combinations."""


class InputError(ReluscopeError):
    """A model or data file that is missing, unreadable, corrupt or of the wrong shape."""


class UnsafeCheckpointError(InputError):
    """A checkpoint that would need pickled code to load, without --trust-checkpoint."""


class ModelRunError(ReluscopeError):
    """The model's forward pass failed on the calibration data (usually a shape mismatch)."""


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): (.+)$")


def first_line(exc: BaseException, *, first_sentence: bool = False) -> str:
    """The line of a library's or model's error that says what went wrong, without a trailing full stop.

    `str(KeyError)` is a repr, so its argument is used. TorchScript's message starts with a
    banner ("The following operation failed in the TorchScript interpreter.") and its own
    traceback: the original error is its last `...Error: ...` line. numpy and torch append
    paragraphs of advice: a long line (or any, with `first_sentence`) keeps its first sentence.
    """
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if len(lines) > 1 and "TorchScript" in line:
        line = next((m.group(2) for m in map(_ERROR_LINE.match, reversed(lines)) if m), line)
    if first_sentence or len(line) > 160:
        line = line.split(". ", 1)[0]
    return line.rstrip(".")
