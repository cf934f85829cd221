"""reluscope: is this trained network healthy? Dead, sparse and saturated ReLU units, ranges, gradients.

Importing the package is cheap: torch and onnxruntime load only when an analysis runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
__all__ = ["analyze", "prune", "Report", "__version__"]

if TYPE_CHECKING:
    from .report import Report


def analyze(model: Any, data: Any = None, **options: Any) -> "Report":
    """See `reluscope.api.analyze`."""
    from .api import analyze as _analyze

    return _analyze(model, data, **options)


def prune(model: Any, data: Any = None, **options: Any) -> tuple[Any, dict[str, Any]]:
    """See `reluscope.pruning.prune`."""
    from .pruning import prune as _prune

    return _prune(model, data, **options)


def __getattr__(name: str) -> Any:
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(name)
