"""Rich views of gate results and of a diff between two reports."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..gate import format_value

MAX_OFFENDERS = 6


def _offenders(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_OFFENDERS])
    if len(names) > MAX_OFFENDERS:
        shown += f" (+{len(names) - MAX_OFFENDERS} more)"
    return shown


def gate_table(gates: Sequence[Mapping[str, Any]], title: str = "gates") -> Group:
    """rule | value | verdict | offending sites, then a one-line verdict."""
    table = Table(title=Text(title), title_justify="left", header_style="bold")
    table.add_column("rule", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("verdict")
    table.add_column("offending sites", overflow="fold")
    for gate in gates:
        passed = gate["passed"]
        table.add_row(Text(gate["rule"]), format_value(gate.get("value")),
                      Text("pass", style="green") if passed else Text("FAIL", style="bold red"),
                      Text(_offenders(gate.get("offenders") or []), style="" if passed else "red"))
    failed = sum(1 for g in gates if not g["passed"])
    line = (Text(f"{failed} of {len(gates)} gates failed", style="bold red") if failed
            else Text(f"all {len(gates)} gates passed", style="green"))
    return Group(table, line)


def _arrow(base: Any, new: Any, pct: bool = False) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}" if pct else format_value(v)

    b, n = fmt(base), fmt(new)
    return n if b == n else f"{b} → {n}"


def _signed(value: Any, pct: bool = False) -> Text:
    if value is None:
        return Text("-", style="dim")
    if value == 0:
        return Text("0", style="dim")
    text = f"{100 * value:+.1f}" if pct else (f"{value:+d}" if isinstance(value, int) else f"{value:+.4g}")
    return Text(text, style="red" if value > 0 else "green")


_STATUS_STYLE = {"changed": "yellow", "unchanged": "dim", "added": "cyan", "removed": "magenta"}


def diff_table(diff: Mapping[str, Any]) -> Table:
    table = Table(title=Text(f"reluscope diff: {diff['base']['path']} → {diff['new']['path']}"), title_justify="left",
                  header_style="bold")
    table.add_column("site", overflow="fold")
    table.add_column("status")
    table.add_column("dead", justify="right")
    table.add_column("Δ dead", justify="right")
    table.add_column("zero %", justify="right")
    table.add_column("Δ zero", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    for site in diff["sites"]:
        b, n, d = site["base"] or {}, site["new"] or {}, site["delta"] or {}
        status = site["status"]
        table.add_row(
            Text(site["name"]), Text(status, style=_STATUS_STYLE.get(status, "")),
            _arrow(b.get("dead_units"), n.get("dead_units")), _signed(d.get("dead_units")),
            _arrow(b.get("zero_fraction"), n.get("zero_fraction"), pct=True), _signed(d.get("zero_fraction"), pct=True),
            _arrow(b.get("min"), n.get("min")), _arrow(b.get("max"), n.get("max")),
            style="dim" if status == "unchanged" else None,
        )
    return table


def diff_summary_text(diff: Mapping[str, Any]) -> Text:
    base, new, delta = diff["summary"]["base"], diff["summary"]["new"], diff["summary"]["delta"]
    text = Text("model: ")
    text.append(f"dead units {_arrow(base.get('dead_units'), new.get('dead_units'))} ")
    text.append_text(Text("(").append_text(_signed(delta.get("dead_units"))).append(")"))
    text.append(f", mean zero % {_arrow(base.get('mean_zero_fraction'), new.get('mean_zero_fraction'), pct=True)}")
    for label, names in (("added", diff["added"]), ("removed", diff["removed"])):
        if names:
            text.append(f"\n{label}: ", style="bold")
            text.append(", ".join(names), style=_STATUS_STYLE[label])
    return text


def diff_renderable(diff: Mapping[str, Any]) -> Group:
    return Group(diff_table(diff), diff_summary_text(diff))
