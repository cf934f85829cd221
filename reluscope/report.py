"""The versioned report, built once from the accumulated statistics.

The dictionary layout is the JSON contract (README.md, `reluscope schema`) (`schema_version` 1; additive
changes keep the version); its fields, their order and the summary totals come from the
catalogue in metrics.py. Everything in it is plain JSON data: no NaN, no tensors. `gates`
starts empty: the CLI evaluates its --fail-on rules into the payload it writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .measure.sites import SiteInfo
from .metrics import SITE_FIELDS, ordered, summarise

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    rare: float = 0.01  # active share below which a unit is "rarely active" (SageMaker Debugger's default)
    dormant_tau: float = 0.025  # tau of the tau-dormant score (Sokar et al., ICML 2023)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits: short in JSON, and never rounded to 0 when it is not 0."""
    return float(f"{value:.{digits}g}")


def build_layer(info: SiteInfo, host: dict[str, Any], thresholds: Thresholds, *, hard_zero: bool,
                upper: float | None) -> dict[str, Any]:
    """One `layers[]` entry from a site's host-side accumulators (see SiteStats.to_host)."""
    active = host["active"]
    units = len(active)
    elements = host["elements"]
    per_unit = elements / units if units else 0
    finite_count = elements - host["nonfinite"]
    active_total = sum(active)
    dead = [u for u, a in enumerate(active) if a == 0] if elements else []
    rare = [u for u, a in enumerate(active) if a > 0 and per_unit and a / per_unit < thresholds.rare]
    dormant: list[int] = []
    if host["abs_sum"] is not None and per_unit:
        unit_means = [s / per_unit for s in host["abs_sum"]]
        site_mean = sum(unit_means) / units if units else 0.0
        dormant = [u for u, m in enumerate(unit_means) if m <= thresholds.dormant_tau * site_mean]
    mean = host["sum"] / finite_count if finite_count else 0.0
    var = max(host["sumsq"] / finite_count - mean * mean, 0.0) if finite_count else 0.0
    return ordered(SITE_FIELDS, {
        "name": info.name,
        "op": info.op,
        "tensor": info.tensor,
        "node": info.node,
        "module": info.module,
        "shape": list(info.shape),
        "unit_axis": info.unit_axis,
        "units": units,
        "samples": host["samples"],
        "zero_fraction": 1.0 - active_total / elements if elements else 0.0,
        "dead_units": dead,
        "dead_fraction": len(dead) / units if units else 0.0,
        "rarely_active_units": rare,
        "rarely_active_fraction": len(rare) / units if units else 0.0,
        "dormant_units": dormant,
        # per unit, the share of its outputs that were active (4 significant digits: the HTML unit strip)
        "unit_active_fraction": [_significant(a / per_unit) for a in active] if per_unit else [0.0] * units,
        "min": _finite_or_none(host["min"]) if finite_count else None,
        "max": _finite_or_none(host["max"]) if finite_count else None,
        "mean": mean,
        "std": math.sqrt(var),
        "nonfinite": host["nonfinite"],
        "saturated_fraction": host["saturated"] / elements if upper is not None and elements else None,
        "percentiles": host.get("percentiles"),
    })


def build_summary(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The `summary` object: the catalogue's model-wide totals over `layers`."""
    return summarise(layers)


@dataclass
class Report:
    """What `reluscope.analyze` returns; `to_dict()` is the JSON contract."""

    tool: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    run: dict[str, Any]
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    gradient_flow: dict[str, Any] | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    unanalysed: list[dict[str, Any]] = field(default_factory=list)  # sites found but not measured, with why

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tool": self.tool,
            "model": self.model,
            "data": self.data,
            "run": self.run,
            "layers": self.layers,
            "summary": self.summary,
            "warnings": self.warnings,
        }
        if self.unanalysed:
            out["unanalysed"] = self.unanalysed
        if self.gradient_flow is not None:
            out["gradient_flow"] = self.gradient_flow
        out["gates"] = self.gates
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def layer(self, name: str) -> dict[str, Any]:
        for entry in self.layers:
            if entry["name"] == name:
                return entry
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [entry["name"] for entry in self.layers]
