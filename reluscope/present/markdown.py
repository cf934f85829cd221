"""The markdown format, for pull-request comments and CI step summaries (GitHub-flavoured tables).

`--format markdown` prints it; when the `GITHUB_STEP_SUMMARY` environment variable names a file
(as it does inside GitHub Actions), the same text is appended there too. The sites table has
the table format's columns (present/cells.py).

Names come from the model file and are data, not markdown: a name goes in a code span (no link,
image, HTML, @mention or emphasis is made inside one) whose fence is longer than any run of
backticks in it; prose that may quote a name (warnings, reasons) has each character that makes markup
backslash-escaped and a zero-width space after each `@` and `#` (no mention, no issue link). Both pass through `cells.visible` first: a CR, LF or other control cannot end a table row.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .cells import is_diff
from .cells import (arrow, format_value, gates_verdict, offender_list, shown_as, signed, site_columns, visible,
                    worst_first)

MAX_ROWS = 50
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


# what makes markdown of text: emphasis, code, links and images, HTML and entities, table pipes,
# autolinks (`http:`, `www.`), headings; `@` and `#` also get a zero-width space (mentions, issues)
_MARKUP = re.compile(r"([\\`*_\[\]<>!|~&:#@]|(?<=www)\.)", re.IGNORECASE)
_TICKS = re.compile("`+")


def literal(text: Any) -> str:
    """Prose that may quote names from a file, as literal markdown text (safe in a table cell)."""
    value = _MARKUP.sub(r"\\\1", visible(text))
    return value.replace("@", "@\u200b").replace("#", "#\u200b")


def code_span(text: Any) -> str:
    """A name as a code span, safe in a table cell."""
    value = visible(text).replace("|", "\\|")
    longest = max((len(run) for run in _TICKS.findall(value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table_lines(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def gates_markdown(gates: Sequence[Mapping[str, Any]]) -> list[str]:
    if not gates:
        return []
    rows = []
    for gate in gates:
        verdict = "✅ pass" if gate["passed"] else "❌ **fail**"
        rows.append([verdict, code_span(gate["rule"]), format_value(gate.get("value")),
                     offender_list(gate.get("offenders") or [], show=code_span)])
    failed, total = gates_verdict(gates)
    verdict_line = f"**{failed} of {total} gates failed.**" if failed else f"All {total} gates passed."
    return ["#### Gates", "", *table_lines(["result", "rule", "value", "offending sites"], ["---", "---", "--:", "---"],
                                      rows), "", verdict_line]


def _sites_table(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = site_columns(layers)
    header = ["site", "op", *(c.label for c in columns)]
    align = ["---", "---", *("--:" for _ in columns)]
    rows = []
    for layer in layers:
        row = [code_span(layer["name"]), code_span(layer["op"])]
        for column in columns:
            text = column.text(layer)
            row.append(f"**{text}**" if column.alarm(layer) else text)
        rows.append(row)
    return table_lines(header, align, rows)


def report_markdown(report: Mapping[str, Any], max_rows: int = MAX_ROWS) -> str:
    """A compact report: summary line, sites table (capped at `max_rows`, worst first when capped), gates."""
    s = report["summary"]
    model = report.get("model") or {}
    run = report.get("run") or {}
    data = report.get("data") or {}
    lines = [f"### reluscope: {code_span(model.get('path') or 'model')}", ""]
    headline = (f"**{s['layers']} sites, {s['units']} units: {s['dead_units']} dead "
                f"({100 * s['dead_fraction']:.1f}%)**, {s.get('rarely_active_units', 0)} rarely active, "
                f"mean zero fraction {100 * s['mean_zero_fraction']:.1f}%")
    if s.get("nonfinite"):
        headline += f", **{s['nonfinite']} NaN/Inf outputs**"
    lines.append(headline)
    lines.append(f"<sub>{data.get('samples', '?')} samples{' (synthetic)' if data.get('synthetic') else ''} · "
                 f"{literal(run.get('backend', '?'))} on {literal(run.get('device', '?'))} · {literal(model.get('format', '?'))}</sub>")
    lines.append("")

    layers = list(report["layers"])
    if layers:
        capped = len(layers) > max_rows
        lines += _sites_table(worst_first(layers)[:max_rows] if capped else layers)
        if capped:
            lines += ["", f"_Showing the {max_rows} sites with the largest dead share of {len(layers)}; "
                          "the JSON report (`-f json`) has all of them._"]
        lines.append("")
    flow = report.get("gradient_flow")
    if isinstance(flow, Mapping):
        if flow.get("available", True):
            lines += [f"Gradient flow: **{literal(flow.get('verdict', '?'))}** (loss {literal(flow.get('loss') or '?')}, "
                      f"first/last gradient-norm ratio {format_value(flow.get('first_to_last_ratio'))}, "
                      f"{flow.get('nonfinite', 0)} NaN/Inf gradients)", ""]
        else:
            lines += [f"Gradient flow: not measured ({literal(flow.get('reason', ''))})", ""]
    notes = [f"⚠️ {literal(w)}" for w in report.get("warnings") or []]
    notes += [f"not analysed: {code_span(u['name'])} ({literal(u['reason'])})" for u in report.get("unanalysed") or []]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += gates_markdown(report.get("gates") or [])
    return "\n".join(lines).rstrip() + "\n"


def _signed(value: float | None, pct: bool = False) -> str:
    text = signed(value, pct)
    return f"{text} pp" if pct and value else text


def diff_markdown(diff: Mapping[str, Any], max_rows: int = MAX_ROWS) -> str:
    """Changed, added and removed sites (capped), the model-wide change, gates."""
    summary = diff["summary"]
    base_s, new_s, delta_s = summary["base"], summary["new"], summary["delta"]
    lines = [f"### reluscope diff: {code_span(diff['base']['path'])} → {code_span(diff['new']['path'])}", ""]
    dead_delta = delta_s.get("dead_units")
    lines.append(f"**Dead units: {arrow(base_s.get('dead_units'), new_s.get('dead_units'))}"
                 f" ({_signed(dead_delta)})**, dead share "
                 f"{arrow(base_s.get('dead_fraction'), new_s.get('dead_fraction'), _pct)}, "
                 f"mean zero fraction {arrow(base_s.get('mean_zero_fraction'), new_s.get('mean_zero_fraction'), _pct)}")
    counts = {status: sum(1 for s in diff["sites"] if s["status"] == status)
              for status in ("changed", "unchanged", "added", "removed")}
    lines.append(f"<sub>{counts['changed']} changed · {counts['unchanged']} unchanged · {counts['added']} added · "
                 f"{counts['removed']} removed</sub>")
    lines.append("")
    interesting = [s for s in diff["sites"] if s["status"] != "unchanged"]
    if interesting:
        rows = []
        for site in interesting[:max_rows]:
            b, n, d = site["base"] or {}, site["new"] or {}, site["delta"] or {}
            newly = site.get("newly_dead") or []
            revived = site.get("revived") or []
            detail = ", ".join(x for x in (f"+{len(newly)} newly dead" if newly else "",
                                           f"{len(revived)} revived" if revived else "") if x)
            rows.append([
                code_span(site["name"]), site["status"], arrow(b.get("dead_units"), n.get("dead_units")),
                _signed(d.get("dead_units")),
                arrow(b.get("zero_fraction"), n.get("zero_fraction"), shown_as("zero_fraction")),
                _signed(d.get("zero_fraction"), pct=True),
                arrow(b.get("min"), n.get("min"), shown_as("min")), arrow(b.get("max"), n.get("max"), shown_as("max")),
                detail,
            ])
        lines += table_lines(["site", "status", "dead", "Δ dead", "zero %", "Δ zero", "min", "max", "unit changes"],
                        ["---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "---"], rows)
        if len(interesting) > max_rows:
            lines += ["", f"_Showing {max_rows} of {len(interesting)} changed sites; `-f json` has all of them._"]
        lines.append("")
    else:
        lines += ["No site changed.", ""]
    lines += gates_markdown(diff.get("gates") or [])
    return "\n".join(lines).rstrip() + "\n"


def append_step_summary(text: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Append to $GITHUB_STEP_SUMMARY when it is set. Returns a warning when that fails, else None."""
    target = (environ if environ is not None else os.environ).get(STEP_SUMMARY_ENV)
    if not target:
        return None
    try:
        with Path(target).open("a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
            handle.write("\n")
    except OSError as exc:
        return f"could not append to ${STEP_SUMMARY_ENV} ({target}): {exc.strerror or exc}"
    return None


class MarkdownFormat:
    """GitHub-flavoured markdown of a report or a diff, gates included; also appended to the step summary."""

    terminal = False
    step_summary = True

    def render(self, document: Mapping[str, Any]) -> str:
        return diff_markdown(document) if is_diff(document) else report_markdown(document)
