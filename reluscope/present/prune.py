"""The prune report (`reluscope prune`) as a table, markdown or JSON, and its one-line summary.

Same conventions as the analysis report: the payload on stdout (or `--report FILE`), the
summary and warnings on stderr.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..options import OutputFormat
from . import Formatter, JsonFormat
from .cells import visible


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _reasons(site: Mapping[str, Any]) -> str:
    """Why units stay, most common reason first: "3: active at coupled site x; 1: ..."."""
    counts = Counter(item["reason"] for item in site["kept_units"])
    return "; ".join(f"{n}: {reason}" for reason, n in counts.most_common())


def _cost_rows(document: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    summary = document["summary"]
    return [
        ("units at pruned sites", _count(summary["units_before"]), _count(summary["units_after"]),
         _ratio(summary["units_after"] / summary["units_before"]) if summary["units_before"] else "-"),
        ("parameters", _count(summary["parameters_before"]), _count(summary["parameters_after"]),
         _ratio(summary["parameters_ratio"])),
        ("MACs per sample", _count(summary["macs_before"]), _count(summary["macs_after"]), _ratio(summary["macs_ratio"])),
        ("CPU latency per batch", _ms(summary["latency_ms_before"]), _ms(summary["latency_ms_after"]),
         _ratio(summary["latency_ratio"])),
    ]


def verdict(document: Mapping[str, Any]) -> str:
    """One line: what was removed, how close the outputs stayed, what was written."""
    summary, check, output = document["summary"], document["verification"], document["output"]
    figure = check.get("mismatch") or f"max relative output difference {check['relative_diff']:.3g}"
    if not check["passed"]:
        return (f"verification failed: {figure} on {check['samples']} samples, above --tolerance "
                f"{check['tolerance']:g}; the pruned model was not written")
    removed = f"removed {summary['removed_units']} of {summary['candidates']} candidate units" \
        if summary["candidates"] else "nothing to remove: the model is unchanged"
    where = f"; written to {output['path']}" if output.get("written") else \
        ("; dry run, nothing written" if output.get("dry_run") else "")
    return f"{removed} ({figure} on {check['samples']} samples, tolerance {check['tolerance']:g}){where}"


class PruneTableFormat:
    terminal = True
    step_summary = False

    def _tables(self, document: Mapping[str, Any]) -> tuple[Table, Table]:
        sites = Table(title="pruned sites", title_justify="left")
        for column, justify in (("site", "left"), ("op", "left"), ("units", "right"), ("after", "right"),
                                ("removed", "right"), ("kept", "right"), ("why kept", "left")):
            sites.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for site in document["sites"]:
            sites.add_row(visible(site["name"]), site["op"], str(site["units_before"]), str(site["units_after"]),
                          str(len(site["removed_units"])), str(len(site["kept_units"])), visible(_reasons(site)))
        cost = Table(title="cost", title_justify="left")
        for column, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
            cost.add_column(column, justify=justify)  # type: ignore[arg-type]
        for row in _cost_rows(document):
            cost.add_row(*row)
        return sites, cost

    def render(self, document: Mapping[str, Any]) -> str:
        from .table import render_text

        return render_text(*self._tables(document), Text(verdict(document)))

    def print(self, document: Mapping[str, Any]) -> None:
        from .table import print_fitted

        sites, cost = self._tables(document)
        console = Console()
        print_fitted(console, sites)
        console.print(cost)
        console.print(Text(verdict(document)), highlight=False, soft_wrap=True)


class PruneMarkdownFormat:
    terminal = False
    step_summary = True

    def render(self, document: Mapping[str, Any]) -> str:
        from .markdown import code_span, literal, table_lines

        lines = ["## reluscope prune", ""]
        lines += table_lines(["site", "op", "units", "after", "removed", "kept", "why kept"],
                        ["---", "---", "--:", "--:", "--:", "--:", "---"],
                        [[code_span(site["name"]), site["op"], str(site["units_before"]), str(site["units_after"]),
                          str(len(site["removed_units"])), str(len(site["kept_units"])), literal(_reasons(site))]
                         for site in document["sites"]])
        lines += [""] + table_lines(["", "before", "after", "ratio"], ["---", "--:", "--:", "--:"],
                               [list(row) for row in _cost_rows(document)])
        lines += ["", literal(verdict(document)), ""]
        return "\n".join(lines)

    def print(self, document: Mapping[str, Any]) -> None:
        raise NotImplementedError("markdown is rendered, not printed")


def prune_format(fmt: OutputFormat) -> Formatter:
    if fmt is OutputFormat.json:
        return JsonFormat()
    if fmt is OutputFormat.markdown:
        return PruneMarkdownFormat()
    return PruneTableFormat()


def emit_prune(result: Any, fmt: OutputFormat, *, model_file: Path | None, report_file: Path | None, quiet: bool,
               err: Console) -> int:
    """Write the pruned model and the report file together (both land or neither does), then the payload on
    stdout, warnings and the verdict on stderr; the exit code: 0, or 1 when the verification failed."""
    from ..errors import EXIT_GATE_FAILED, EXIT_OK
    from .emit import deliver

    document = result.report
    files: list[tuple[Path, str | bytes]] = []
    if model_file is not None and result.payload is not None:
        document["output"].update(path=str(model_file), written=True)
        files.append((model_file, result.payload))
    on_terminal = deliver(document, prune_format(fmt), output=report_file, err=err, also=files)
    passed = document["verification"]["passed"]
    if not passed:
        err.print(Text.assemble(("error:", "bold red"), " ", visible(verdict(document))), highlight=False,
                  soft_wrap=True)
    elif not quiet and not on_terminal:
        err.print(Text(visible(verdict(document)), style="dim"), highlight=False, soft_wrap=True)
    return EXIT_OK if passed else EXIT_GATE_FAILED
