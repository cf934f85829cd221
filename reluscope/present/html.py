"""One self-contained HTML page from one or more JSON reports (`--html`, `reluscope report`).

The JSON report stays the single source: every chart and table here is computed from report
dictionaries as `reluscope analyze -f json` writes them (or as `Report.to_dict()` returns them).
Charts are Plotly figures, built here as plain dictionaries and drawn in the browser by plotly.js,
which is inlined in the page (gzip-compressed and base64-encoded: 1.4 MB instead of 4.8 MB; the
browser's DecompressionStream unpacks it when the page opens). Nothing is fetched at view time.

Plotly is the optional extra `reluscope[html]`; without it `require_plotly` says how to install it.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .. import __version__
from ..errors import UsageError

INSTALL_HINT = 'HTML reports need Plotly: pip install "reluscope[html]"'

# Colours, one per quantity, the same in every chart.
ZERO, DEAD, RARE, DORMANT = "#4c78a8", "#d62728", "#f58518", "#9467bd"
MAX, P999, P99, P50, P1, MIN = "#1f3b73", "#3b6fb6", "#72a1e5", "#54a24b", "#b5bd68", "#8c8c8c"
GRAD, RATIO, REL = "#e45756", "#4c78a8", "#e45756"
ALIVE_SCALE = ["#deebf7", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]  # active fraction 0+ .. 1
STRIP_WIDTH_SMALL, STRIP_WIDTH_LARGE = 64, 128  # units per strip row
TRANSITIONS = (("alive in both", "#c6dbef"), ("dead in both", "#444444"), ("died", DEAD), ("revived", "#2ca02c"))


# ----------------------------------------------------------------------------- plotly.js
def require_plotly() -> None:
    """Raise a usage error (exit 2, one line) when the `html` extra is not installed."""
    try:
        import plotly.offline  # noqa: F401
    except ImportError as exc:
        raise UsageError(INSTALL_HINT) from exc


@functools.lru_cache(maxsize=1)
def _plotly_bundle() -> tuple[str, str]:
    """(plotly.js version, the minified bundle gzip-compressed and base64-encoded)."""
    require_plotly()
    import plotly.offline

    source = plotly.offline.get_plotlyjs().encode("utf-8")
    packed = gzip.compress(source, compresslevel=9, mtime=0)  # mtime 0: the same page for the same reports
    version = "?"
    try:
        from plotly.offline.offline import get_plotlyjs_version

        version = get_plotlyjs_version()
    except Exception:  # noqa: BLE001 - the version is only shown in the footer
        pass
    return version, base64.b64encode(packed).decode("ascii")


def _asset(name: str) -> str:
    return (resources.files("reluscope.present") / "html_assets" / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- small helpers
def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _positive(value: Any) -> float | None:
    """For log axes: zeros and negatives cannot be drawn (the hover and the table still show them)."""
    value = _finite(value)
    return value if value is not None and value > 0 else None


def _pct(value: Any) -> str:
    value = _finite(value)
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: Any) -> str:
    value = _finite(value)
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def report_label(report: Mapping[str, Any], index: int) -> str:
    path = (report.get("model") or {}).get("path")
    return Path(path).name if path else f"report {index + 1}"


def _labels(reports: Sequence[Mapping[str, Any]], labels: Sequence[str] | None) -> list[str]:
    names = list(labels) if labels is not None else [report_label(r, i) for i, r in enumerate(reports)]
    seen: dict[str, int] = {}
    out = []
    for name in names:  # unique: they label the axes of the sequence charts
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def _layout(title: str, *, y_title: str = "", y_log: bool = False, y_percent: bool = False, height: int = 340,
            x_title: str = "site (in order of the forward pass)", **extra: Any) -> dict[str, Any]:
    yaxis: dict[str, Any] = {"title": {"text": y_title}, "automargin": True, "zeroline": False}
    if y_log:
        yaxis.update(type="log", tickformat="~g")
    if y_percent:
        yaxis.update(tickformat=".0%", rangemode="tozero")
    layout = {
        "title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 48, "b": 40},
        "xaxis": {"title": {"text": x_title}, "automargin": True, "type": "category", "tickangle": -40},
        "yaxis": yaxis,
        "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 1, "xanchor": "right"},
        "hovermode": "closest",
        "plot_bgcolor": "#ffffff",
        "paper_bgcolor": "#ffffff",
        "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
    }
    layout.update(extra)
    return layout


def _figure(data: list[dict[str, Any]], layout: dict[str, Any], **meta: Any) -> dict[str, Any]:
    figure: dict[str, Any] = {"data": data, "layout": layout}
    if meta:
        figure["meta"] = meta
    return figure


# ----------------------------------------------------------------------------- one report, by depth
def activity_figure(report: Mapping[str, Any]) -> dict[str, Any]:
    """Zero fraction (line) and dead / rarely-active / dormant share of units (bars), by site."""
    layers = report["layers"]
    names = [l["name"] for l in layers]
    units = [l["units"] for l in layers]

    def share(key: str) -> list[float]:
        return [len(l.get(key) or []) / l["units"] if l["units"] else 0.0 for l in layers]

    def counts(key: str) -> list[str]:
        return [f"{len(l.get(key) or [])} of {l['units']} units" for l in layers]

    data = []
    for key, label, colour in (("dead_units", "dead", DEAD), ("rarely_active_units", "rarely active", RARE),
                               ("dormant_units", "dormant", DORMANT)):
        if key == "dead_units" or any(l.get(key) for l in layers):
            data.append({"type": "bar", "name": f"{label} units", "x": names, "y": share(key),
                         "customdata": counts(key), "marker": {"color": colour},
                         "hovertemplate": f"%{{x}}<br>{label}: %{{y:.2%}} (%{{customdata}})<extra></extra>"})
    data.append({"type": "scatter", "mode": "lines+markers", "name": "zero fraction (outputs)", "x": names,
                 "y": [l["zero_fraction"] for l in layers], "customdata": units,
                 "line": {"color": ZERO, "width": 2}, "marker": {"size": 6},
                 "hovertemplate": "%{x}<br>zero fraction: %{y:.4%} of outputs (%{customdata} units)<extra></extra>"})
    return _figure(data, _layout("Where units die: zero fraction and dead / rarely-active share by depth",
                                 y_title="share", y_percent=True, barmode="group"))


def ranges_figure(report: Mapping[str, Any]) -> dict[str, Any]:
    """Output range per site on a log axis: max, the percentiles when measured, min (and |min| when < 0)."""
    layers = report["layers"]
    names = [l["name"] for l in layers]
    data = []

    def trace(label: str, values: list[Any], colour: str, *, symbol: str = "circle", dash: str = "solid",
              exact: list[Any] | None = None) -> None:
        shown = [_positive(v) for v in values]
        if not any(v is not None for v in shown):
            return
        data.append({"type": "scatter", "mode": "lines+markers", "name": label, "x": names, "y": shown,
                     "customdata": [_num(v) for v in (exact if exact is not None else values)],
                     "line": {"color": colour, "dash": dash, "width": 1.5},
                     "marker": {"color": colour, "symbol": symbol, "size": 7}, "connectgaps": False,
                     "hovertemplate": f"%{{x}}<br>{label}: %{{customdata}}<extra></extra>"})

    trace("max", [l.get("max") for l in layers], MAX, symbol="triangle-up")
    quantiles = [l.get("percentiles") or {} for l in layers]
    for key, colour in (("p99.9", P999), ("p99", P99), ("p50", P50), ("p1", P1)):
        if any(key in q for q in quantiles):
            trace(key, [q.get(key) for q in quantiles], colour, dash="dot")
    trace("min", [l.get("min") for l in layers], MIN, symbol="triangle-down")
    mins = [l.get("min") for l in layers]
    if any(_finite(m) is not None and m < 0 for m in mins):
        trace("−min (most negative output)", [-m if _finite(m) is not None and m < 0 else None for m in mins],
              MIN, symbol="x", dash="dash", exact=mins)
    return _figure(data, _layout("Output range per site (log scale; zeros are not drawn, the table has them)",
                                 y_title="output value", y_log=True))


def saturation_figure(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """Share of outputs at the upper bound, for bounded ops (ReLU6, clamp with a max)."""
    layers = report["layers"]
    if not any(l.get("saturated_fraction") is not None for l in layers):
        return None
    names = [l["name"] for l in layers]
    data = [{"type": "bar", "name": "saturated", "x": names, "y": [l.get("saturated_fraction") for l in layers],
             "customdata": [l["op"] for l in layers], "marker": {"color": RARE},
             "hovertemplate": "%{x} (%{customdata})<br>at the upper bound: %{y:.4%}<extra></extra>"}]
    return _figure(data, _layout("Saturation of bounded activations (share of outputs at the upper bound; "
                                 "no bar: unbounded op)", y_title="saturated", y_percent=True, height=300))


def gradient_sites_figure(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """RMS of d(loss)/d(site output), by site."""
    layers = report["layers"]
    if not any("gradient" in l for l in layers):
        return None
    names = [l["name"] for l in layers]
    rms = [(l.get("gradient") or {}).get("rms") for l in layers]
    zero = [(l.get("gradient") or {}).get("zero_fraction") for l in layers]
    data = [{"type": "scatter", "mode": "lines+markers", "name": "gradient RMS", "x": names,
             "y": [_positive(v) for v in rms], "customdata": [[_num(r), _pct(z)] for r, z in zip(rms, zero)],
             "line": {"color": GRAD, "width": 2}, "marker": {"size": 7},
             "hovertemplate": "%{x}<br>gradient RMS: %{customdata[0]}<br>exactly zero: %{customdata[1]}"
                              "<extra></extra>"}]
    return _figure(data, _layout("Gradient RMS at each site's output (log scale): where gradients fade",
                                 y_title="RMS of d(loss)/d(output)", y_log=True, height=300))


def gradient_parameters_figure(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per parameter: gradient-to-weight ratio, and the gradient norm relative to the last weighted
    layer's, against the vanishing and exploding bands of the verdict."""
    flow = report.get("gradient_flow")
    if not flow or not flow.get("available", True) or not flow.get("parameters"):
        return None
    params = flow["parameters"]
    names = [p["name"] for p in params]
    weighted = [len(p.get("shape") or ()) >= 2 and p.get("grad_norm") is not None for p in params]
    last = next((p["grad_norm"] for p, w in zip(reversed(params), reversed(weighted)) if w), None)
    relative = [p["grad_norm"] / last if w and last else None for p, w in zip(params, weighted)]
    thresholds = flow.get("thresholds") or {}
    vanishing, exploding = thresholds.get("vanishing", 1e-3), thresholds.get("exploding", 1e3)
    hover = [[_num(p.get("grad_norm")), _num(p.get("weight_norm")), _num(p.get("ratio")), _num(r)]
             for p, r in zip(params, relative)]
    template = ("%{x}<br>grad norm: %{customdata[0]}<br>weight norm: %{customdata[1]}<br>grad/weight: "
                "%{customdata[2]}<br>grad norm / last weighted layer's: %{customdata[3]}<extra></extra>")
    data = [
        {"type": "scatter", "mode": "markers", "name": "grad / weight norm", "x": names,
         "y": [_positive(p.get("ratio")) for p in params], "customdata": hover,
         "marker": {"color": RATIO, "size": 8, "symbol": "diamond"}, "hovertemplate": template},
        {"type": "scatter", "mode": "lines+markers", "name": "grad norm / last weighted layer's (weights only)",
         "x": names, "y": [_positive(r) for r in relative], "customdata": hover, "connectgaps": True,
         "line": {"color": REL, "width": 1.5, "dash": "dot"}, "marker": {"color": REL, "size": 7},
         "hovertemplate": template},
    ]
    values = [v for v in [_positive(p.get("ratio")) for p in params] + [_positive(r) for r in relative] if v]
    low = min(values + [vanishing]) / 10
    high = max(values + [exploding]) * 10
    bands = [
        {"type": "rect", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": low, "y1": vanishing,
         "fillcolor": "rgba(214,39,40,0.10)", "line": {"width": 0}, "layer": "below"},
        {"type": "rect", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": exploding, "y1": high,
         "fillcolor": "rgba(245,133,24,0.12)", "line": {"width": 0}, "layer": "below"},
    ]
    notes = [
        {"xref": "paper", "yref": "y", "x": 0.005, "y": math.log10(vanishing), "yanchor": "top", "xanchor": "left",
         "showarrow": False, "font": {"size": 11, "color": DEAD},
         "text": f"vanishing band: grad norm < {vanishing:g} × the last weighted layer's"},
        {"xref": "paper", "yref": "y", "x": 0.005, "y": math.log10(exploding), "yanchor": "bottom",
         "xanchor": "left", "showarrow": False, "font": {"size": 11, "color": RARE},
         "text": f"exploding band: grad norm > {exploding:g} × the last weighted layer's"},
    ]
    verdict = flow.get("verdict", "?")
    layout = _layout(f"Parameter gradients (log scale), verdict: {verdict}", y_title="ratio", y_log=True,
                     x_title="parameter (definition order)", shapes=bands, annotations=notes)
    layout["yaxis"]["range"] = [math.log10(low), math.log10(high)]
    return _figure(data, layout)


def _strip_width(unit_counts: Iterable[int]) -> int:
    return STRIP_WIDTH_LARGE if max(unit_counts, default=0) > 512 else STRIP_WIDTH_SMALL


def _strip(sites: list[tuple[str, list[float | None]]], width: int) -> tuple[list[list[float | None]], list[list[Any]]]:
    """Per-unit values wrapped into rows of `width` cells, one empty row between sites.
    Returns (z, rows) with rows[i] = [site name, first unit of the row] (None for the gaps)."""
    z: list[list[float | None]] = []
    rows: list[list[Any]] = []
    for index, (name, values) in enumerate(sites):
        if index:
            z.append([None] * width)
            rows.append([None, None])
        for start in range(0, max(len(values), 1), width):
            chunk = values[start:start + width]
            z.append(chunk + [None] * (width - len(chunk)))
            rows.append([name, start])
    return z, rows


def _strip_layout(title: str, z: list[list[Any]], rows: list[list[Any]], width: int) -> dict[str, Any]:
    row_px = max(3, min(16, 1800 // max(len(z), 1)))
    ticks = [(i, r[0]) for i, r in enumerate(rows) if r[0] is not None and (i == 0 or rows[i - 1][0] != r[0])]
    return _layout(title, height=max(220, 90 + row_px * len(z)), x_title=f"unit (rows of {width}; a site's units wrap)",
                   xaxis={"title": {"text": f"unit index within the row (rows of {width} units)"}, "type": "linear",
                          "showgrid": False, "zeroline": False, "range": [-0.5, width - 0.5]},
                   yaxis={"autorange": "reversed", "tickmode": "array", "tickvals": [t[0] for t in ticks],
                          "ticktext": [t[1] for t in ticks], "showgrid": False, "zeroline": False,
                          "automargin": True},
                   margin={"l": 60, "r": 20, "t": 48, "b": 40})


def unit_strip_figure(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """Every unit of every site, a cell coloured by its active fraction; dead units in red."""
    layers = report["layers"]
    if not layers:
        return None
    sites = []
    for layer in layers:
        values = layer.get("unit_active_fraction")
        if values is None or len(values) != layer["units"]:  # an older report: only the dead units are known
            dead = set(layer.get("dead_units") or [])
            values = [0.0 if u in dead else None for u in range(layer["units"])]
        sites.append((layer["name"], list(values)))
    width = _strip_width(l["units"] for l in layers)
    z, rows = _strip(sites, width)
    # 0 (dead) gets its own colour; any activity at all starts the blue scale.
    scale = [[0.0, DEAD], [1e-9, ALIVE_SCALE[0]], [0.25, ALIVE_SCALE[1]], [0.5, ALIVE_SCALE[2]],
             [0.75, ALIVE_SCALE[3]], [1.0, ALIVE_SCALE[4]]]
    data = [{"type": "heatmap", "z": z, "zmin": 0, "zmax": 1, "colorscale": scale, "xgap": 1, "ygap": 1,
             "hoverongaps": False, "colorbar": {"title": {"text": "active<br>fraction"}, "tickformat": ".0%",
                                                 "len": 1, "thickness": 12},
             "hovertemplate": "%{customdata[0]}<br>unit %{customdata[1]}<br>active fraction: %{z:.4g}"
                              "<extra></extra>"}]
    missing = any(layer.get("unit_active_fraction") is None for layer in layers)
    title = "Unit strips: each unit a cell coloured by its active fraction (red: dead)"
    if missing:
        title += " — this report has no per-unit fractions: dead units only"
    return _figure(data, _strip_layout(title, z, rows, width), kind="units", rows=rows, width=width)


def depth_figures(report: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    return {
        "activity": activity_figure(report),
        "ranges": ranges_figure(report),
        "saturation": saturation_figure(report),
        "grad_sites": gradient_sites_figure(report),
        "grad_params": gradient_parameters_figure(report),
        "units": unit_strip_figure(report),
    }


# ----------------------------------------------------------------------------- a sequence of reports
def _site_order(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    order: dict[str, None] = {}
    for report in reports:
        for layer in report["layers"]:
            order.setdefault(layer["name"], None)
    return list(order)


def sequence_heatmap(reports: Sequence[Mapping[str, Any]], labels: list[str], key: str, title: str,
                     scale: Any) -> dict[str, Any]:
    """Site (rows, in depth order) by checkpoint (columns): `key` ('dead' or 'zero')."""
    sites = _site_order(reports)
    by_name = [{l["name"]: l for l in r["layers"]} for r in reports]
    z, hover = [], []
    for name in sites:
        row, notes = [], []
        for layers in by_name:
            layer = layers.get(name)
            if layer is None:
                row.append(None)
                notes.append("site not in this report")
            elif key == "dead":
                row.append(layer["dead_fraction"])
                notes.append(f"{len(layer['dead_units'])} of {layer['units']} units dead")
            else:
                row.append(layer["zero_fraction"])
                notes.append(f"{layer['units']} units")
        z.append(row)
        hover.append(notes)
    data = [{"type": "heatmap", "x": labels, "y": sites, "z": z, "zmin": 0, "zmax": 1, "colorscale": scale,
             "customdata": hover, "xgap": 2, "ygap": 2, "hoverongaps": False,
             "texttemplate": "%{z:.0%}" if len(sites) * len(labels) <= 400 else "",
             "colorbar": {"tickformat": ".0%", "thickness": 12},
             "hovertemplate": "%{y} at %{x}<br>%{z:.2%}<br>%{customdata}<extra></extra>"}]
    height = 110 + max(len(sites), 2) * max(8, min(28, 900 // max(len(sites), 1)))
    layout = _layout(title, height=height, x_title="report (in the order given)",
                     yaxis={"autorange": "reversed", "type": "category", "automargin": True})
    layout["xaxis"]["tickangle"] = 0 if len(labels) <= 8 else -40
    return _figure(data, layout)


def sequence_summary_figure(reports: Sequence[Mapping[str, Any]], labels: list[str]) -> dict[str, Any]:
    data = []
    for key, label, colour in (("dead_fraction", "dead units (model)", DEAD),
                               ("rarely_active_fraction", "rarely active units (model)", RARE),
                               ("mean_zero_fraction", "mean zero fraction", ZERO)):
        data.append({"type": "scatter", "mode": "lines+markers", "name": label, "x": labels,
                     "y": [r["summary"].get(key) for r in reports], "line": {"color": colour, "width": 2},
                     "hovertemplate": f"%{{x}}<br>{label}: %{{y:.3%}}<extra></extra>"})
    layout = _layout("Model-wide shares across the reports", y_title="share", y_percent=True, height=300,
                     x_title="report (in the order given)")
    layout["xaxis"]["tickangle"] = 0 if len(labels) <= 8 else -40
    return _figure(data, layout)


def _pairs(count: int) -> list[tuple[int, int]]:
    """Diffs offered: first -> last, then each consecutive pair (at most 20 in all)."""
    pairs = [(0, count - 1)] + [(i, i + 1) for i in range(count - 1) if (i, i + 1) != (0, count - 1)]
    return pairs[:20]


def diff_figures(base: Mapping[str, Any], new: Mapping[str, Any], base_label: str,
                 new_label: str) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """(bars of units that died / revived per site, unit strip of the transitions, the diff's sites)."""
    from ..diff import diff_reports

    document = diff_reports(base, new, base_path=Path(base_label), new_path=Path(new_label))
    sites = [s for s in document["sites"] if s["status"] != "removed"]
    names = [s["name"] for s in sites]
    died = [len(s["newly_dead"] or []) for s in sites]
    revived = [len(s["revived"] or []) for s in sites]
    data = [
        {"type": "bar", "name": "units that died", "x": names, "y": died, "marker": {"color": DEAD},
         "hovertemplate": "%{x}<br>died: %{y} units<extra></extra>"},
        {"type": "bar", "name": "units that revived", "x": names, "y": [-r for r in revived],
         "customdata": revived, "marker": {"color": TRANSITIONS[3][1]},
         "hovertemplate": "%{x}<br>revived: %{customdata} units<extra></extra>"},
    ]
    bars = _figure(data, _layout(f"Dead units {base_label} → {new_label}: died (up) and revived (down) per site",
                                 y_title="units", barmode="relative", height=320))
    new_layers = {l["name"]: l for l in new["layers"]}
    base_layers = {l["name"]: l for l in base["layers"]}
    strips = []
    for site in sites:
        if site["newly_dead"] is None:  # added, or the unit count changed: no unit-by-unit comparison
            continue
        units = new_layers[site["name"]]["units"]
        before, after = set(base_layers[site["name"]]["dead_units"]), set(new_layers[site["name"]]["dead_units"])
        states: list[float | None] = []
        for u in range(units):
            states.append(float(1 if u in before and u in after else 2 if u in after else 3 if u in before else 0))
        strips.append((site["name"], states))
    strip = None
    if strips:
        width = _strip_width(len(s[1]) for s in strips)
        z, rows = _strip(strips, width)
        n = len(TRANSITIONS)
        scale = []
        for i, (_, colour) in enumerate(TRANSITIONS):
            scale += [[i / n, colour], [(i + 1) / n, colour]]
        ticks = {"tickvals": [i * (n - 1) / n + (n - 1) / (2 * n) for i in range(n)],
                 "ticktext": [t[0] for t in TRANSITIONS]}
        strip_data = [{"type": "heatmap", "z": z, "zmin": 0, "zmax": n - 1, "colorscale": scale, "xgap": 1,
                       "ygap": 1, "hoverongaps": False,
                       "colorbar": {"thickness": 12, "len": 1, "tickmode": "array", **ticks},
                       "hovertemplate": "%{customdata[0]}<br>unit %{customdata[1]}: %{customdata[2]}<extra></extra>"}]
        strip = _figure(strip_data, _strip_layout(f"Unit by unit, {base_label} → {new_label}", z, rows, width),
                        kind="transitions", rows=rows, width=width, states=[t[0] for t in TRANSITIONS])
    return bars, strip, document["sites"]


# ----------------------------------------------------------------------------- HTML parts
def _gates_html(reports: Sequence[Mapping[str, Any]], labels: list[str]) -> str:
    rows = []
    for label, report in zip(labels, reports):
        for gate in report.get("gates") or []:
            verdict = "passed" if gate.get("passed") else "FAILED"
            offenders = ", ".join(gate.get("offenders") or []) or "-"
            rows.append(f"<tr class=\"{'pass' if gate.get('passed') else 'fail'}\">"
                        + (f"<td>{_esc(label)}</td>" if len(reports) > 1 else "")
                        + f"<td><code>{_esc(gate.get('rule'))}</code></td><td>{verdict}</td>"
                        f"<td class=\"num\">{_esc(_num(gate.get('value')))}</td><td>{_esc(offenders)}</td></tr>")
    if not rows:
        return "<p class=\"muted\">No gates: run <code>reluscope analyze</code> with <code>--fail-on RULE</code> " \
               "to gate on these numbers.</p>"
    head = ("<th>report</th>" if len(reports) > 1 else "") + "<th>rule</th><th>result</th><th>value</th>" \
        "<th>offending sites</th>"
    return f"<table class=\"data gates\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _warnings_html(reports: Sequence[Mapping[str, Any]], labels: list[str]) -> str:
    items = []
    for label, report in zip(labels, reports):
        prefix = f"<b>{_esc(label)}</b>: " if len(reports) > 1 else ""
        items += [f"<li>{prefix}{_esc(w)}</li>" for w in report.get("warnings") or []]
        items += [f"<li>{prefix}not analysed: <code>{_esc(u.get('name'))}</code> ({_esc(u.get('reason'))})</li>"
                  for u in report.get("unanalysed") or []]
        flow = report.get("gradient_flow")
        if flow and not flow.get("available", True):
            items.append(f"<li>{prefix}gradient flow: {_esc(flow.get('reason'))}</li>")
    if not items:
        return "<p class=\"muted\">No warnings.</p>"
    return f"<ul class=\"warnings\">{''.join(items)}</ul>"


def _summary_html(report: Mapping[str, Any]) -> str:
    s = report["summary"]
    flow = report.get("gradient_flow") or {}
    cards = [
        ("sites", str(s["layers"])), ("units", str(s["units"])),
        ("dead units", f"{s['dead_units']} ({_pct(s['dead_fraction'])})"),
        ("rarely active", f"{s['rarely_active_units']} ({_pct(s['rarely_active_fraction'])})"),
        ("mean zero fraction", _pct(s["mean_zero_fraction"])),
        ("samples", str((report.get("data") or {}).get("samples", "-"))),
    ]
    if s.get("nonfinite"):
        cards.append(("NaN/Inf outputs", str(s["nonfinite"])))
    if flow.get("available", False) and flow.get("verdict"):
        cards.append(("gradient flow", str(flow["verdict"])))
    bad = {"dead units": s["dead_units"] > 0, "NaN/Inf outputs": True,
           "gradient flow": flow.get("verdict") not in (None, "ok")}
    return "".join(f"<div class=\"card{' bad' if bad.get(k) else ''}\"><div class=\"k\">{_esc(k)}</div>"
                   f"<div class=\"v\">{_esc(v)}</div></div>" for k, v in cards)


def _units_text(units: list[int], limit: int = 40) -> str:
    if not units:
        return ""
    shown = ", ".join(str(u) for u in units[:limit])
    return shown + (f", … (+{len(units) - limit})" if len(units) > limit else "")


def _sites_table(report: Mapping[str, Any]) -> str:
    layers = report["layers"]
    quantile_keys = [k for k in ("p1", "p50", "p99", "p99.9") if any(k in (l.get("percentiles") or {}) for l in layers)]
    saturation = any(l.get("saturated_fraction") is not None for l in layers)
    gradient = any("gradient" in l for l in layers)
    head = ["#", "site", "op", "units", "zero fraction", "dead units", "dead share", "rarely active",
            "dormant", "min", *quantile_keys, "max", "mean", "std", "NaN/Inf"]
    if saturation:
        head.append("saturated")
    if gradient:
        head += ["grad RMS", "grad zero"]
    head.append("dead unit indices")
    rows = []
    for i, l in enumerate(layers):
        q = l.get("percentiles") or {}
        cells = [str(i), l["name"], l["op"], str(l["units"]), _pct(l["zero_fraction"]), str(len(l["dead_units"])),
                 _pct(l["dead_fraction"]), str(len(l["rarely_active_units"])), str(len(l["dormant_units"])),
                 _num(l.get("min")), *[_num(q.get(k)) for k in quantile_keys], _num(l.get("max")),
                 _num(l.get("mean")), _num(l.get("std")), str(l.get("nonfinite", 0))]
        if saturation:
            cells.append(_pct(l.get("saturated_fraction")))
        if gradient:
            g = l.get("gradient") or {}
            cells += [_num(g.get("rms")), _pct(g.get("zero_fraction"))]
        cells.append(_units_text(l["dead_units"]))
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    table = (f"<table class=\"data\"><thead><tr>{''.join(f'<th>{_esc(h)}</th>' for h in head)}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    flow = report.get("gradient_flow")
    if flow and flow.get("available", True) and flow.get("parameters"):
        prow = "".join(f"<tr><td>{_esc(p['name'])}</td><td>{_esc('×'.join(map(str, p.get('shape') or [])))}</td>"
                       f"<td>{_esc(_num(p.get('grad_norm')))}</td><td>{_esc(_num(p.get('weight_norm')))}</td>"
                       f"<td>{_esc(_num(p.get('ratio')))}</td></tr>" for p in flow["parameters"])
        table += ("<h4>Parameter gradients</h4><table class=\"data\"><thead><tr><th>parameter</th><th>shape</th>"
                  "<th>grad norm</th><th>weight norm</th><th>grad/weight</th></tr></thead>"
                  f"<tbody>{prow}</tbody></table>")
    return table


def _sequence_table(reports: Sequence[Mapping[str, Any]], labels: list[str]) -> str:
    sites = _site_order(reports)
    by_name = [{l["name"]: l for l in r["layers"]} for r in reports]
    head = "<th>site</th>" + "".join(f"<th>{_esc(lb)}<br>dead</th><th>{_esc(lb)}<br>zero</th>" for lb in labels)
    rows = []
    for name in sites:
        cells = [f"<td>{_esc(name)}</td>"]
        for layers in by_name:
            layer = layers.get(name)
            cells += ([f"<td>{len(layer['dead_units'])}/{layer['units']}</td><td>{_pct(layer['zero_fraction'])}</td>"]
                      if layer else ["<td>-</td><td>-</td>"])
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class=\"data\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _diff_table(sites: list[dict[str, Any]]) -> str:
    rows = []
    for s in sites:
        if s["status"] in ("added", "removed"):
            rows.append(f"<tr><td>{_esc(s['name'])}</td><td>{s['status']}</td><td></td><td></td><td></td></tr>")
            continue
        base, new = s["base"] or {}, s["new"] or {}
        rows.append(f"<tr><td>{_esc(s['name'])}</td><td>{s['status']}</td>"
                    f"<td>{_esc(str(base.get('dead_units')) + ' → ' + str(new.get('dead_units')))}</td>"
                    f"<td>{_esc(_units_text(s['newly_dead'] or []))}</td><td>{_esc(_units_text(s['revived'] or []))}</td></tr>")
    return ("<table class=\"data\"><thead><tr><th>site</th><th>status</th><th>dead units</th><th>units that died</th>"
            f"<th>units that revived</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _json_script(element_id: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"<script type=\"application/json\" id=\"{element_id}\">{text}</script>"


def _chart(name: str, title_note: str = "") -> str:
    return f"<div class=\"chart\" data-fig=\"{name}\" role=\"img\" aria-label=\"{_esc(title_note or name)}\"></div>"


# ----------------------------------------------------------------------------- the page
def render_html(reports: list[dict[str, Any]], *, title: str | None = None,
                labels: Sequence[str] | None = None) -> str:
    """One self-contained HTML page for `reports` (JSON reports as loaded), read as a sequence in the
    given order (checkpoints of one training run, or base then candidate). `labels` name the reports
    (default: the model file names)."""
    if not reports:
        raise UsageError("no reports to render")
    plotly_version, plotly_packed = _plotly_bundle()
    names = _labels(reports, labels)
    if len(names) != len(reports):
        raise UsageError(f"{len(reports)} reports but {len(names)} labels")
    many = len(reports) > 1
    shown = len(reports) - 1  # by-depth charts and the site table start at the last report
    page: dict[str, Any] = {
        "labels": names,
        "shown": shown,
        "depth": [depth_figures(r) for r in reports],
        "sequence": None,
        "diffs": [],
    }
    diff_tables = []
    if many:
        page["sequence"] = {
            "seq_dead": sequence_heatmap(reports, names, "dead", "Dead share of units per site across the reports "
                                         "(which layer died when)", [[0, "#fff5f0"], [1, "#a50f15"]]),
            "seq_zero": sequence_heatmap(reports, names, "zero", "Zero fraction per site across the reports",
                                         [[0, "#f7fbff"], [1, "#08306b"]]),
            "seq_summary": sequence_summary_figure(reports, names),
        }
        for a, b in _pairs(len(reports)):
            bars, strip, sites = diff_figures(reports[a], reports[b], names[a], names[b])
            page["diffs"].append({"label": f"{names[a]} → {names[b]}", "diff_bars": bars, "diff_units": strip})
            diff_tables.append(_diff_table(sites))
    heading = title or ("reluscope: " + (f"{len(reports)} reports, {names[0]} → {names[-1]}" if many else names[0]))
    report_options = "".join(f"<option value=\"{i}\"{' selected' if i == shown else ''}>{_esc(n)}</option>"
                             for i, n in enumerate(names))
    selector = (f"<label class=\"controls\">report shown: <select id=\"report-select\">{report_options}</select>"
                "</label>") if many else ""
    depth_tables = "".join(f"<div class=\"per-report\" data-report=\"{i}\"{'' if i == shown else ' hidden'}>"
                           f"<div class=\"cards\">{_summary_html(r)}</div></div>" for i, r in enumerate(reports))
    site_tables = "".join(f"<div class=\"per-report\" data-report=\"{i}\"{'' if i == shown else ' hidden'}>"
                          f"<h3>{_esc(names[i])}</h3>{_sites_table(r)}</div>" for i, r in enumerate(reports))
    model_lines = "".join(
        f"<li><b>{_esc(n)}</b>: {_esc((r.get('model') or {}).get('format', '?'))} "
        f"<code>{_esc((r.get('model') or {}).get('path') or '-')}</code>, "
        f"{_esc((r.get('data') or {}).get('samples', '?'))} samples of {_esc((r.get('data') or {}).get('source', '?'))}"
        f"{' (synthetic)' if (r.get('data') or {}).get('synthetic') else ''}, "
        f"reluscope {_esc((r.get('tool') or {}).get('version', '?'))}</li>" for n, r in zip(names, reports))
    sequence_html = ""
    if many:
        pair_options = "".join(f"<option value=\"{i}\">{_esc(d['label'])}</option>" for i, d in enumerate(page["diffs"]))
        pair_tables = "".join(f"<div class=\"per-diff\" data-diff=\"{i}\"{'' if i == 0 else ' hidden'}>{t}</div>"
                              for i, t in enumerate(diff_tables))
        sequence_html = f"""
<section id="sequence"><h2>Across the reports</h2>
{_chart("seq_dead")}{_chart("seq_zero")}{_chart("seq_summary")}
</section>
<section id="diff"><h2>Diff of two reports</h2>
<label class="controls">compare: <select id="diff-select">{pair_options}</select></label>
{_chart("diff_bars")}{_chart("diff_units")}
<details class="table-view"><summary>Table: units that died and revived</summary>{pair_tables}</details>
</section>"""
    body = f"""<header>
<h1>{_esc(heading)}</h1>
<ul class="models">{model_lines}</ul>
</header>
<section id="verdict"><h2>Gates and warnings</h2>
{_gates_html(reports, names)}
{_warnings_html(reports, names)}
</section>
<section id="depth"><h2>By depth</h2>
{selector}
{depth_tables}
{_chart("activity")}{_chart("ranges")}{_chart("saturation")}{_chart("grad_sites")}{_chart("grad_params")}
{_chart("units")}
</section>
{sequence_html}
<section id="tables"><h2>Table view</h2>
<p class="muted">The same numbers, for copy and paste.</p>
{site_tables}
{('<h3>Across the reports: dead units / zero fraction per site</h3>' + _sequence_table(reports, names)) if many else ''}
</section>
<footer>reluscope {_esc(__version__)} · charts: plotly.js {_esc(plotly_version)}, inlined · rendered from the JSON
report{'s' if many else ''} (schema version {_esc(reports[-1].get('schema_version', '?'))})</footer>"""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(heading)}</title>
<style>{_asset("page.css")}</style>
</head><body>
<div id="status" class="status">Loading charts…</div>
{body}
{_json_script("reluscope-page", page)}
<script type="text/plain" id="plotly-gz">{plotly_packed}</script>
<script>{_asset("page.js")}</script>
</body></html>
"""
