"""The one path from a finished payload to the user, shared by `analyze`, `diff` and `prune` (`deliver`).

Payload on stdout (or atomically in `-o FILE`); warnings, the summary lines (sites, units and
dead units, worst sites, sites not analysed; for a diff, the model-wide change and the added and
removed sites) and the gate table on stderr, except that a table on stdout keeps its gate table
with it; `--quiet` leaves out the summary and the gate table (a failed gate still prints one
line); the GitHub step summary for markdown; JUnit for `--junit`; and the exit code from the gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.text import Text

from ..errors import EXIT_GATE_FAILED, EXIT_OK
from ..gate import failed
from ..output import emit, write_together
from . import Formatter, OutputFormat, is_diff, to_format
from .cells import describe, visible


def _warn(err: Console, message: str) -> None:
    err.print(Text.assemble(("warning:", "bold yellow"), " ", visible(message)), highlight=False, soft_wrap=True)


def show_gates(gates: Sequence[Mapping[str, Any]], *, on_stdout: bool, quiet: bool, err: Console,
               title: str = "gates") -> None:
    """The gate table: with the payload when that is a table on stdout, else on stderr (with
    --quiet, only a line per failed gate)."""
    if not gates:
        return
    from .gates import gate_table

    if on_stdout or not quiet:
        from .table import print_fitted

        table, verdict = gate_table(gates, title=title).renderables
        print_fitted(Console() if on_stdout else err, table, verdict)
    else:
        for gate in failed(gates):
            err.print(Text.assemble(("gate failed:", "bold red"), " ", describe(gate)), highlight=False, soft_wrap=True)


def gate_exit(gates: Sequence[Mapping[str, Any]]) -> int:
    return EXIT_GATE_FAILED if failed(gates) else EXIT_OK


def deliver(document: Mapping[str, Any], formatter: Formatter, *, output: Path | None, err: Console,
            also: Sequence[tuple[Path, str | bytes]] = ()) -> bool:
    """Render the payload, write it to `output` (when given) together with the files in `also` (all land or
    none does), then the warnings on stderr and the payload on stdout (unless it went to `output`); markdown
    also goes to the GitHub step summary. Nothing reaches stdout or stderr before the writes succeeded, so a
    write that fails ends with its one error line. Returns whether the payload was printed on a terminal."""
    on_terminal = formatter.terminal and output is None
    text = None if on_terminal else formatter.render(document)
    files: list[tuple[Path, str | bytes]] = []
    if output is not None:
        assert text is not None
        files.append((output, text))
    files.extend(also)
    write_together(files)
    for warning in document.get("warnings") or []:
        _warn(err, warning)
    if on_terminal:
        formatter.print(document)
        return True
    assert text is not None
    if output is None:
        emit(text, None)
    if formatter.step_summary:
        from .markdown import append_step_summary

        problem = append_step_summary(text)
        if problem:
            _warn(err, problem)
    return False


def emit_document(document: Mapping[str, Any], fmt: OutputFormat, *, output: Path | None, junit: Path | None,
                  quiet: bool, err: Console, also: Sequence[tuple[Path, str]] = (), bars: bool = True) -> int:
    """Deliver a payload whose `gates` are evaluated (see `deliver`; `-o`, `--junit` and the files in
    `also`, such as the HTML page, land together); returns the exit code."""
    extra: list[tuple[Path, str | bytes]] = []
    if junit is not None:
        from .junit import JUnitFormat

        extra.append((junit, JUnitFormat().render(document)))
    extra.extend(also)
    on_terminal = deliver(document, to_format(fmt, bars=bars), output=output, err=err, also=extra)
    if not quiet:  # the summary lines, whatever the payload's format and destination, wrapped to stderr's width
        from .table import diff_summary_text, summary_text

        err.print(diff_summary_text(document) if is_diff(document) else summary_text(document), highlight=False)
        if output is not None:
            err.print(Text(f"report written to {visible(output)}", style="dim"), highlight=False, soft_wrap=True)
    gates = document.get("gates") or []
    show_gates(gates, on_stdout=on_terminal, quiet=quiet, err=err)
    return gate_exit(gates)
