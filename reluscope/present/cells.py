"""Cell text that every format shares: numbers, unit lists, offender lists, worst-first order,
and the per-site columns (from the metric catalogue) that the table and markdown both show.

Plain strings only: each format adds its own emphasis (Rich styles, markdown bold/code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..metrics import Metric, site_metric, site_value

MAX_OFFENDERS = 6
WORST_SHOWN = 3

# Characters that do something other than show themselves: C0/C1 controls (ESC starts terminal
# escape sequences: clearing the screen, OSC 8 hyperlinks; CR overwrites a line; NUL and most
# controls are not allowed in XML 1.0), bidirectional and zero-width format characters (they
# disguise text), line/paragraph separators, surrogates and non-characters.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
                        "\ufff9-\ufffb\ufffe\uffff\ud800-\udfff]")


def _escaped(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: Any) -> str:
    """Text from a model or data file (site and model names, paths) as it may be shown anywhere:
    every control, format or non-character written as a visible `\\xNN`/`\\uNNNN` escape, so it
    cannot drive a terminal, break a line or a table row, or make XML unparsable. Each format
    then escapes its own markup (Rich, markdown, XML) on top of this; JSON keeps the data as is."""
    return _INVISIBLE.sub(_escaped, str(text))


def format_value(value: Any) -> str:
    """Numbers for people: integers as integers, floats with 4 significant digits (gate values, totals)."""
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def format_measure(value: float | None) -> str:
    """A measured output value (min, max, percentiles, gradient RMS): 4 significant digits, or
    3 in scientific notation far from 1, so that a column of them stays narrow."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def format_percent(value: float | None) -> str:
    """A 0..1 share as a percentage with one decimal, without the % sign (the header says it)."""
    return "-" if value is None else f"{100 * value:.1f}"


def units_cell(units: Sequence[int] | None, total: int) -> str:
    """How many units of `total` a unit list holds: `0`, or `12 (9%)`."""
    count = len(units or [])
    if not count:
        return "0"
    return f"{count} ({100 * count / total:.0f}%)" if total else str(count)


def offender_list(names: Sequence[str], limit: int = MAX_OFFENDERS, show: Callable[[str], str] = str) -> str:
    """The first `limit` names, then `and N more`."""
    shown = ", ".join(show(name) for name in names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def describe(gate: Mapping[str, Any], max_offenders: int = 8) -> str:
    """One line about a gate, e.g. for JUnit messages and --quiet output."""
    verdict = "passed" if gate["passed"] else "FAILED"
    text = f"{visible(gate['rule'])}: {verdict} (value {format_value(gate.get('value'))})"
    offenders = gate.get("offenders") or []
    if offenders:
        text += f"; offending sites: {offender_list(offenders, max_offenders, show=visible)}"
    return text


def gates_verdict(gates: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(failed, total)."""
    return sum(1 for g in gates if not g["passed"]), len(gates)


def _rank(layer: Mapping[str, Any]) -> tuple[float, float]:
    return (-layer["dead_fraction"], -layer["zero_fraction"])


def worst_first(layers: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Sites by dead share, then zero fraction, largest first."""
    return sorted(layers, key=_rank)


def worst_sites(layers: Iterable[Mapping[str, Any]], count: int = WORST_SHOWN) -> list[str]:
    """The sites with dead units that a person should look at first."""
    return [layer["name"] for layer in worst_first(l for l in layers if l["dead_units"])][:count]


# ---------------------------------------------------------------------------------------------------------------
# Per-site columns

_CELL: dict[str, Callable[[Any], str]] = {
    "count": lambda value: "-" if value is None else str(value),
    "percent": format_percent,
    "measure": format_measure,
}


@dataclass(frozen=True)
class Column:
    path: str  # `field` or `field.member` of a `layers[]` entry
    metric: Metric

    @property
    def label(self) -> str:
        assert self.metric.label is not None
        return self.metric.label

    def text(self, layer: Mapping[str, Any]) -> str:
        value = site_value(layer, self.path)
        if self.metric.cell == "units":
            return units_cell(value, layer["units"])
        return _CELL[self.metric.cell or "count"](value)

    def alarm(self, layer: Mapping[str, Any]) -> bool:
        """The cell shows a problem (emphasised by the format)."""
        return self.metric.alarm and bool(site_value(layer, self.path))

    def shown(self, layers: Sequence[Mapping[str, Any]]) -> bool:
        if self.metric.always:
            return True
        field = self.path.partition(".")[0]
        return any(_present(layer.get(field)) for layer in layers)


def _present(value: Any) -> bool:
    return value is not None and value != [] and value != {}


#: The per-site columns after `site` and `op`, in the order the table and markdown show them.
COLUMN_ORDER = ("units", "zero_fraction", "dead_units", "rarely_active_units", "dormant_units", "saturated_fraction",
                "min", "max", "percentiles.p50", "percentiles.p99.9", "gradient.rms")
COLUMNS = tuple(Column(path, site_metric(path)) for path in COLUMN_ORDER)


def site_columns(layers: Sequence[Mapping[str, Any]]) -> list[Column]:
    """The columns for these sites: the fixed ones, and each optional one that some site has."""
    return [column for column in COLUMNS if column.shown(layers)]


def shown_as(path: str) -> Callable[[Any], str]:
    """How the column of a per-site metric shows a bare value (diff views, for both sides)."""
    return _CELL[site_metric(path).cell or "count"]


def arrow(base: Any, new: Any, show: Callable[[Any], str] = format_value) -> str:
    """`new`, or `base → new` when they read differently."""
    b, n = show(base), show(new)
    return n if b == n else f"{b} → {n}"


def signed(value: Any, pct: bool = False) -> str:
    """A change with its sign: `+3`, `-0.25`, `+1.2` (percentage points when `pct`); `0`, or `-` for none."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if pct:
        return f"{100 * value:+.1f}"
    return f"{value:+d}" if isinstance(value, int) else f"{value:+.4g}"


def is_diff(document: Mapping[str, Any]) -> bool:
    """A `reluscope diff` document, as opposed to a report."""
    return document.get("kind") == "diff"
