"""Frozen options of one analysis, validated once at the edge (CLI or API).

The fields follow from the analysis options declared in `options.py` (name, type, default), in the
order of `reluscope analyze --help`: an option is added there, once, and appears here, on the command
line, as a keyword of `reluscope.analyze` and (where declared) as a config-file key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from .errors import UsageError
from .options import ANALYSIS_OPTIONS, Option


MAX_DEVICE_INDEX = 1023


def _validate(self: Any) -> None:
    if self.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
    if self.max_samples is not None and self.max_samples < 1:
        raise UsageError(f"--max-samples must be at least 1, not {self.max_samples}")
    if self.max_length < 1:
        raise UsageError(f"--max-length must be at least 1, not {self.max_length}")
    if not 0.0 <= self.rare_threshold <= 1.0:
        raise UsageError(f"--rare-threshold must lie in [0, 1], not {self.rare_threshold}")
    if not (math.isfinite(self.dormant_tau) and self.dormant_tau >= 0.0):
        raise UsageError(f"--dormant-tau must be a non-negative finite number, not {self.dormant_tau}")
    if self.stats_kernel not in ("auto", "triton", "torch"):
        raise UsageError(f"--stats-kernel {self.stats_kernel!r} must be auto, triton or torch")
    device = self.device.lower()
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isascii()
            and device[5:].isdigit()):
        raise UsageError(f"--device {self.device!r} must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda:") and int(device[5:]) > MAX_DEVICE_INDEX:
        raise UsageError(f"--device {self.device}: no machine has that many GPUs; use cuda:N with N the index of a "
                         "visible GPU (nvidia-smi lists them), or auto")


def _from_cli(cls: type, values: Mapping[str, Any]) -> Any:
    """The config from the command's option values (after the config file filled in); an analysis option the
    command does not offer (`prune` has no --gradients) takes its default."""
    return cls(**{o.name: o.from_cli(values.get(o.name, o.default)) for o in ANALYSIS_OPTIONS})


def _from_keywords(cls: type, options: Mapping[str, Any]) -> Any:
    """The config from keywords of `reluscope.analyze`; an unknown keyword is a TypeError, as Python's own."""
    declared = {o.name: o for o in ANALYSIS_OPTIONS}
    for name in options:
        if name not in declared:
            raise TypeError(f"analyze() got an unexpected keyword argument {name!r}. "
                            f"Known options: {', '.join(declared)}")
    return cls(**{name: declared[name].from_api(value) for name, value in options.items()})


def _field(option: Option) -> tuple[str, Any, Any]:
    return (option.name, option.field_type or option.type,
            dataclasses.field(default=option.default, metadata={"option": option}))


AnalyzeConfig = dataclasses.make_dataclass(
    "AnalyzeConfig", [_field(o) for o in ANALYSIS_OPTIONS], frozen=True,
    namespace={"__doc__": "The settings of one analysis; see `options.ANALYSIS_OPTIONS`.",
               "__module__": __name__,
               "__post_init__": _validate,
               "from_cli": classmethod(_from_cli),
               "from_keywords": classmethod(_from_keywords)})
