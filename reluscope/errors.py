"""Domain errors, each mapped to one of the exit codes of the CLI contract.

The CLI turns these into one line on stderr (no traceback unless --debug).
"""

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class ReluscopeError(Exception):
    """Base class: a problem the user can act on. `exit_code` follows DESIGN.md."""

    exit_code = EXIT_USAGE


class UsageError(ReluscopeError):
    """Bad option values or combinations."""


class InputError(ReluscopeError):
    """A model or data file that is missing, unreadable, corrupt or of the wrong shape."""


class UnsafeCheckpointError(InputError):
    """A checkpoint that would need pickled code to load, without --trust-checkpoint."""


class ModelRunError(ReluscopeError):
    """The model's forward pass failed on the calibration data (usually a shape mismatch)."""
