"""Rendering a report for people (Rich table) and machines (JSON). No analysis happens here."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

WORST_SHOWN = 3


def _fmt_range(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def _units_cell(units: list[int], total: int) -> str:
    if not units:
        return "0"
    return f"{len(units)} ({100 * len(units) / total:.0f}%)" if total else str(len(units))


def worst_sites(layers: list[dict[str, Any]], count: int = WORST_SHOWN) -> list[str]:
    """Sites with the largest dead share (then zero fraction): what a person should look at first."""
    ranked = sorted((l for l in layers if l["dead_units"]), key=lambda l: (-l["dead_fraction"], -l["zero_fraction"]))
    return [l["name"] for l in ranked[:count]]


def layers_table(report: dict[str, Any], *, bars: bool = False) -> Table:
    layers = report["layers"]
    worst = set(worst_sites(layers))
    show_saturation = any(l.get("saturated_fraction") is not None for l in layers)
    show_dormant = any(l["dormant_units"] for l in layers)
    show_gradient = any("gradient" in l for l in layers)
    show_percentiles = any(l.get("percentiles") for l in layers)
    table = Table(title=f"reluscope: {report['model'].get('path') or 'model'}", title_justify="left",
                  show_lines=False, header_style="bold")
    table.add_column("site", no_wrap=True)
    table.add_column("op", no_wrap=True)
    table.add_column("units", justify="right", no_wrap=True)
    table.add_column("zero %", justify="right", no_wrap=True)
    if bars:
        from .bars import HEADER, share_bar

        table.add_column(HEADER, no_wrap=True)
    table.add_column("dead", justify="right", no_wrap=True)
    table.add_column("rarely active", justify="right", no_wrap=True)
    if show_dormant:
        table.add_column("dormant", justify="right", no_wrap=True)
    if show_saturation:
        table.add_column("sat. %", justify="right", no_wrap=True)
    table.add_column("min", justify="right", no_wrap=True)
    table.add_column("max", justify="right", no_wrap=True)
    if show_percentiles:
        table.add_column("p50", justify="right", no_wrap=True)
        table.add_column("p99.9", justify="right", no_wrap=True)
    if show_gradient:
        table.add_column("grad rms", justify="right", no_wrap=True)
    for layer in layers:
        units = layer["units"]
        dead = _units_cell(layer["dead_units"], units)
        style = "bold red" if layer["name"] in worst else ("red" if layer["dead_units"] else None)
        row = [
            layer["name"], layer["op"], str(units), f"{100 * layer['zero_fraction']:.1f}",
            *([share_bar(layer)] if bars else []),
            Text(dead, style="red" if layer["dead_units"] else ""),
            _units_cell(layer["rarely_active_units"], units),
        ]
        if show_dormant:
            row.append(_units_cell(layer["dormant_units"], units))
        if show_saturation:
            sat = layer.get("saturated_fraction")
            row.append("-" if sat is None else f"{100 * sat:.1f}")
        row += [_fmt_range(layer["min"]), _fmt_range(layer["max"])]
        if show_percentiles:
            quantiles = layer.get("percentiles") or {}
            row += [_fmt_range(quantiles.get("p50")), _fmt_range(quantiles.get("p99.9"))]
        if show_gradient:
            row.append(_fmt_range((layer.get("gradient") or {}).get("rms")))
        table.add_row(*row, style=style)
    return table


def summary_text(report: dict[str, Any]) -> Text:
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
        text.append(", ".join(worst), style="bold red")
    for item in report.get("unanalysed", []):
        text.append(f"\nnot analysed: {item['name']} ({item['reason']})", style="yellow")
    return text


def table_renderable(report: dict[str, Any], *, bars: bool = False) -> Group:
    parts: list[Any] = [layers_table(report, bars=bars), summary_text(report)]
    if report.get("gradient_flow") is not None:
        from .gradients import gradient_renderable

        parts.append(gradient_renderable(report["gradient_flow"]))
    return Group(*parts)


def print_table(report: dict[str, Any], *, bars: bool = True) -> None:
    """The table on stdout, never squeezed: Rich would cut numbers to "5.…" to fit a narrow (or
    piped, 80-column) console, so the console widens to the table's natural width instead.
    `bars`: a zero/dead share bar per site, drawn only when stdout is a terminal."""
    console = Console()
    bars = bars and console.is_terminal
    natural = natural_width(report, bars=bars)
    if natural > console.width:
        console = Console(width=natural)
    console.print(table_renderable(report, bars=bars))


def natural_width(report: dict[str, Any], *, bars: bool = False) -> int:
    """Columns the layer table needs to show every cell in full."""
    return Console(width=10_000).measure(layers_table(report, bars=bars)).maximum


def render_table(report: dict[str, Any]) -> str:
    """The table as plain text (for -o FILE), as wide as it needs."""
    return render_text(table_renderable(report), width=max(120, natural_width(report)))


def render_text(*renderables: RenderableType, width: int = 120) -> str:
    """Plain text of Rich renderables (for -o FILE)."""
    console = Console(record=True, width=width, force_terminal=False, no_color=True, file=io.StringIO())
    for item in renderables:
        console.print(item)
    return console.export_text(styles=False)
