"""The one path from a finished payload to the user, shared by `analyze` and `diff`.

Payload on stdout (or atomically in `-o FILE`); warnings, the summary and the gate table on
stderr, except that a table on stdout keeps its gate table with it; the GitHub step summary
for markdown; JUnit for `--junit`; and the exit code from the gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.text import Text

from ..errors import EXIT_GATE_FAILED, EXIT_OK
from ..gate import failed
from ..output import emit, write_together
from . import OutputFormat, is_diff, to_format
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

    if on_stdout:
        Console().print(gate_table(gates, title=title))
    elif not quiet:
        err.print(gate_table(gates, title=title))
    else:
        for gate in failed(gates):
            err.print(Text.assemble(("gate failed:", "bold red"), " ", describe(gate)), highlight=False, soft_wrap=True)


def gate_exit(gates: Sequence[Mapping[str, Any]]) -> int:
    return EXIT_GATE_FAILED if failed(gates) else EXIT_OK


def emit_document(document: Mapping[str, Any], fmt: OutputFormat, *, output: Path | None, junit: Path | None,
                  quiet: bool, err: Console, also: Sequence[tuple[Path, str]] = (), bars: bool = True) -> int:
    """Deliver a payload whose `gates` are evaluated; returns the exit code.

    Everything is rendered first, then `-o`, `--junit` and the files in `also` (path, text: the
    HTML page) are written together (all land or none does); only then does anything reach stdout
    or stderr, so a write that fails ends with its one error line and nothing else."""
    formatter = to_format(fmt, bars=bars)
    on_terminal = formatter.terminal and output is None
    text = None if on_terminal else formatter.render(document)
    files: list[tuple[Path, str]] = []
    if output is not None:
        assert text is not None
        files.append((output, text))
    if junit is not None:
        from .junit import JUnitFormat

        files.append((junit, JUnitFormat().render(document)))
    files.extend(also)
    write_together(files)
    for warning in document.get("warnings") or []:
        _warn(err, warning)
    if on_terminal:
        formatter.print(document)
    else:
        assert text is not None
        if output is None:
            emit(text, None)
        if formatter.step_summary:
            from .markdown import append_step_summary

            problem = append_step_summary(text)
            if problem:
                _warn(err, problem)
    if output is not None and not quiet and not is_diff(document):
        from .table import summary_text

        err.print(summary_text(document))
        err.print(Text(f"report written to {visible(output)}", style="dim"))
    gates = document.get("gates") or []
    show_gates(gates, on_stdout=on_terminal, quiet=quiet, err=err)
    return gate_exit(gates)
