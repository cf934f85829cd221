"""The table format: Rich tables for people, of a report or of a diff. On a terminal it prints
in colour on stdout; for `-o FILE` the same tables as plain text.

Names from the model or data file go in as `Text` (never as markup: `[/]` would crash Rich,
`[link=...]` would make a link, `resnet[v2]` would lose its `[v2]`) after `cells.visible`
(no escape sequence reaches the terminal or the file)."""

from __future__ import annotations

import io
from typing import Any, Mapping

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .cells import is_diff
from .cells import arrow, shown_as, signed, site_columns, visible, worst_sites


def layers_table(report: Mapping[str, Any], *, bars: bool = False) -> Table:
    layers = report["layers"]
    worst = set(worst_sites(layers))
    columns = site_columns(layers)
    table = Table(title=Text(f"reluscope: {visible(report['model'].get('path') or 'model')}"), title_justify="left",
                  show_lines=False, header_style="bold")
    table.add_column("site", no_wrap=True)
    table.add_column("op", no_wrap=True)
    for column in columns:
        table.add_column(column.label, justify="right")
        if bars and column.metric.name == "zero_fraction":
            from .bars import HEADER

            table.add_column(HEADER, no_wrap=True)
    for layer in layers:
        style = "bold red" if layer["name"] in worst else ("red" if layer["dead_units"] else None)
        cells: list[Any] = [Text(visible(layer["name"])), Text(visible(layer["op"]))]
        for column in columns:
            text = column.text(layer)
            cells.append(Text(text, style="red" if column.alarm(layer) else "") if column.metric.alarm else text)
            if bars and column.metric.name == "zero_fraction":
                from .bars import share_bar

                cells.append(share_bar(layer))
        table.add_row(*cells, style=style)
    return table


def summary_text(report: Mapping[str, Any]) -> Text:
    s = report["summary"]
    text = Text()
    text.append(f"{s['layers']} sites, {s['units']} units: ")
    text.append(f"{s['dead_units']} dead ({100 * s['dead_fraction']:.1f}%)",
                style="bold red" if s["dead_units"] else "green")
    text.append(f", {s['rarely_active_units']} rarely active, mean zero fraction {100 * s['mean_zero_fraction']:.1f}%")
    if s.get("nonfinite"):
        text.append(f", {s['nonfinite']} NaN/Inf outputs", style="bold red")
    data = report["data"]
    text.append(f"  [{data['samples']} samples, {report['run']['backend']} on {report['run']['device']}, "
                f"{report['run']['seconds']:.2f} s]", style="dim")
    worst = worst_sites(report["layers"])
    if worst:
        text.append("\nworst: ", style="bold")
        text.append(", ".join(visible(name) for name in worst), style="bold red")
    for item in report.get("unanalysed", []):
        text.append(f"\nnot analysed: {visible(item['name'])} ({visible(item['reason'])})", style="yellow")
    return text


def table_renderable(report: Mapping[str, Any], *, bars: bool = False, summary: bool = True) -> Group:
    """The report's tables; with `summary`, its summary lines under the layer table (the -o file keeps
    them; on stdout they are left out: `emit_document` prints them on stderr)."""
    parts: list[Any] = [layers_table(report, bars=bars)]
    if summary:
        parts.append(summary_text(report))
    if report.get("gradient_flow") is not None:
        from .gradients import gradient_renderable

        parts.append(gradient_renderable(report["gradient_flow"]))
    return Group(*parts)


def natural_width(report: Mapping[str, Any], *, bars: bool = False) -> int:
    """Columns the layer table needs to show every cell in full."""
    return Console(width=10_000).measure(layers_table(report, bars=bars)).maximum


def _unsqueezed(table: Table) -> Console:
    """A stdout console as wide as the layer table: Rich would cut numbers to "5.…" to fit a narrow
    (80-column CI log, or piped) console, so the console widens to the table instead (it scrolls)."""
    console = Console()
    needed = Console(width=10_000).measure(table).maximum
    return Console(width=needed) if needed > console.width else console


def _words(cell: Any) -> tuple[int, int]:
    """(longest word, longest line) of a cell, in terminal columns."""
    from rich.cells import cell_len

    text = cell.plain if isinstance(cell, Text) else str(cell)
    lines = text.splitlines() or [""]
    return (max((cell_len(word) for word in text.split()), default=0), max(cell_len(line) for line in lines))


def fitted(table: Table, width: int) -> int:
    """Fit `table` into `width` columns without cutting a word: each column gets at least its longest
    word (a number, a name), cells wrap only at spaces (a diff's `3.984 → 4.01`). Rich alone shrinks
    columns below that and cuts their words to "…" or folds them mid-number. Returns the width the
    table needs: `width`, or more when even its longest words do not fit (the table then scrolls)."""
    spans = []
    for column in table.columns:
        cells = [column.header, *column.cells]
        measured = [_words(cell) for cell in cells]
        pad = table.padding[1] + table.padding[3]  # (top, right, bottom, left)
        spans.append((max(m[0] for m in measured), max(m[1] for m in measured), pad))
    borders = len(spans) + 1 if table.box is not None else 0
    fixed = sum(pad for _, _, pad in spans) + borders
    least, most = sum(low for low, _, _ in spans), sum(high for _, high, _ in spans)
    if fixed + most <= width:
        return width  # fits as it is
    if fixed + least > width:
        for column, (low, high, _) in zip(table.columns, spans):
            column.width, column.no_wrap = high, True  # scrolls: no wrapping at all
        return fixed + most
    widths = [high for _, high, _ in spans]
    for _ in range(fixed + most - width):  # one column narrower at a time: the one with the most room to wrap
        index = max(range(len(widths)), key=lambda i: widths[i] - spans[i][0])
        widths[index] -= 1
    for column, chosen in zip(table.columns, widths):
        column.width = chosen
    return width


def print_fitted(console: Console, table: Table, *after: RenderableType) -> None:
    """`table` (then `after`) on `console`, fitted to its width (see `fitted`), or on a wider console
    writing to the same stream when the table needs more (it scrolls, nothing is cut)."""
    needed = fitted(table, console.width)
    if needed > console.width:
        console = Console(width=needed, file=console.file, stderr=console.stderr,
                          force_terminal=console.is_terminal, no_color=console.no_color)
    console.print(table)
    for item in after:
        console.print(item)


def render_text(*renderables: RenderableType, width: int = 120) -> str:
    """Plain text of Rich renderables (for -o FILE)."""
    console = Console(record=True, width=width, force_terminal=False, no_color=True, file=io.StringIO())
    for item in renderables:
        console.print(item)
    return console.export_text(styles=False)


# ---------------------------------------------------------------------------------------------------------------
# Diff

_STATUS_STYLE = {"changed": "yellow", "unchanged": "dim", "added": "cyan", "removed": "magenta"}


def _signed(value: Any, pct: bool = False) -> Text:
    text = signed(value, pct)
    if value is None or value == 0:
        return Text(text, style="dim")
    return Text(text, style="red" if value > 0 else "green")


def diff_table(diff: Mapping[str, Any]) -> Table:
    table = Table(title=Text(f"reluscope diff: {visible(diff['base']['path'])} → {visible(diff['new']['path'])}"),
                  title_justify="left",
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
            Text(visible(site["name"])), Text(visible(status), style=_STATUS_STYLE.get(status, "")),
            arrow(b.get("dead_units"), n.get("dead_units")), _signed(d.get("dead_units")),
            arrow(b.get("zero_fraction"), n.get("zero_fraction"), shown_as("zero_fraction")),
            _signed(d.get("zero_fraction"), pct=True),
            arrow(b.get("min"), n.get("min"), shown_as("min")), arrow(b.get("max"), n.get("max"), shown_as("max")),
            style="dim" if status == "unchanged" else None,
        )
    return table


def diff_summary_text(diff: Mapping[str, Any]) -> Text:
    base, new, delta = diff["summary"]["base"], diff["summary"]["new"], diff["summary"]["delta"]
    text = Text("model: ")
    text.append(f"dead units {arrow(base.get('dead_units'), new.get('dead_units'))} ")
    text.append_text(Text("(").append_text(_signed(delta.get("dead_units"))).append(")"))
    text.append(f", mean zero % "
                f"{arrow(base.get('mean_zero_fraction'), new.get('mean_zero_fraction'), shown_as('zero_fraction'))}")
    for label, names in (("added", diff["added"]), ("removed", diff["removed"])):
        if names:
            text.append(f"\n{label}: ", style="bold")
            text.append(", ".join(visible(name) for name in names), style=_STATUS_STYLE[label])
    return text


# ---------------------------------------------------------------------------------------------------------------
# The format


class TableFormat:
    """Rich tables; the gate table follows the payload (on stdout, or in the file). `bars`: a
    zero/dead share bar per site, drawn only when stdout is a terminal (never in files)."""

    terminal = True
    step_summary = False

    def __init__(self, bars: bool = True) -> None:
        self.bars = bars

    def render(self, document: Mapping[str, Any]) -> str:
        """Plain text for -o FILE: the payload's tables and, when there are gates, the gate table."""
        from .gates import gate_table

        gates = [gate_table(document["gates"])] if document.get("gates") else []
        if is_diff(document):
            table = diff_table(document)
            width = fitted(table, 120)
            return render_text(table, diff_summary_text(document), *gates, width=width)
        text = render_text(table_renderable(document), width=max(120, natural_width(document)))
        return text.rstrip("\n") + "\n" + render_text(*gates) if gates else text

    def print(self, document: Mapping[str, Any]) -> None:
        """The payload on stdout: the tables alone (the summary lines go to stderr, see emit.py). A
        table is never squeezed: the console widens to it (see `_unsqueezed`)."""
        if is_diff(document):
            print_fitted(Console(), diff_table(document))
            return
        bars = self.bars and Console().is_terminal
        table = layers_table(document, bars=bars)
        console = _unsqueezed(table)
        console.print(table)
        if document.get("gradient_flow") is not None:
            from .gradients import gradient_renderable

            console.print(gradient_renderable(document["gradient_flow"]))
