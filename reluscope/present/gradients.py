"""Rich view of gradient flow: one row per weighted layer, a bar of log10 gradient norm, so the
slope from input to output is visible at a glance."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .cells import visible

BAR_WIDTH = 24
SPARK = "▁▂▃▄▅▆▇█"
_VERDICT_STYLE = {"ok": "green", "vanishing": "bold red", "exploding": "bold red"}


def sparkline(values: list[float]) -> str:
    """log10 values squeezed into eight block heights."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = high - low or 1.0
    return "".join(SPARK[int((v - low) / span * (len(SPARK) - 1))] if math.isfinite(v) else "!" for v in values)


def gradient_renderable(flow: dict[str, Any]) -> Group | Text:
    if not flow.get("available", True):
        return Text(f"gradient flow: {visible(flow.get('reason'))}", style="yellow")
    # Weighted layers (conv/linear kernels, two or more axes), in definition order.
    weighted = [p for p in flow["parameters"] if len(p.get("shape", ())) >= 2 and p["grad_norm"] is not None]
    logs = [math.log10(p["grad_norm"]) if p["grad_norm"] > 0 else -math.inf for p in weighted]
    finite = [v for v in logs if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    table = Table(title="gradient flow (input → output)", title_justify="left", header_style="bold")
    table.add_column("parameter", overflow="fold")
    table.add_column("grad norm", justify="right")
    table.add_column("grad/weight", justify="right")
    table.add_column(f"log10 grad norm [{low:.1f} to {high:.1f}]")
    for param, value in zip(weighted, logs):
        filled = 0 if not math.isfinite(value) else 1 + round((value - low) / ((high - low) or 1.0) * (BAR_WIDTH - 1))
        ratio = param["ratio"]
        table.add_row(Text(visible(param["name"])), f"{param['grad_norm']:.3g}", "-" if ratio is None else f"{ratio:.3g}",
                      Text("█" * filled, style="cyan"))
    verdict = flow["verdict"]
    line = Text("verdict: ")
    line.append(verdict, style=_VERDICT_STYLE.get(verdict, ""))
    if flow.get("first_to_last_ratio") is not None:
        line.append(f"  (first/last weighted layer gradient norm {flow['first_to_last_ratio']:.3g}; "
                    f"slope {sparkline(logs)})")
    line.append(f"  loss: {visible(flow['loss'])}", style="dim")
    if flow.get("nonfinite"):
        line.append(f"  {flow['nonfinite']} non-finite gradients", style="bold red")
    return Group(table, line)
