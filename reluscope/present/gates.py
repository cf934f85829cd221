"""Rich view of gate results: with the table payload on stdout, or on stderr for other formats."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .cells import format_value, gates_verdict, offender_list, visible


def gate_table(gates: Sequence[Mapping[str, Any]], title: str = "gates") -> Group:
    """rule | value | verdict | offending sites, then a one-line verdict."""
    table = Table(title=Text(title), title_justify="left", header_style="bold")
    table.add_column("rule", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("verdict")
    table.add_column("offending sites", overflow="fold")
    for gate in gates:
        passed = gate["passed"]
        table.add_row(Text(visible(gate["rule"])), format_value(gate.get("value")),
                      Text("pass", style="green") if passed else Text("FAIL", style="bold red"),
                      Text(offender_list(gate.get("offenders") or [], show=visible), style="" if passed else "red"))
    failed, total = gates_verdict(gates)
    line = (Text(f"{failed} of {total} gates failed", style="bold red") if failed
            else Text(f"all {total} gates passed", style="green"))
    return Group(table, line)
