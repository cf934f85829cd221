"""A compact bar per site for the terminal table: the shape of the network at a glance.

One cell per 1/WIDTH of the site: red for its dead share of units, then yellow up to its zero
fraction (dead units output only zeros, so the zero fraction is never below the dead share), then
dim for active outputs.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

WIDTH = 12
HEADER = "zero/dead"


def share_bar(layer: dict[str, Any], width: int = WIDTH) -> Text:
    dead = max(0.0, min(1.0, float(layer.get("dead_fraction") or 0.0)))
    zero = max(dead, min(1.0, float(layer.get("zero_fraction") or 0.0)))
    dead_cells = round(dead * width)
    if layer.get("dead_units") and dead_cells == 0:
        dead_cells = 1  # one dead unit must show
    zero_cells = max(round(zero * width), dead_cells)
    bar = Text()
    bar.append("█" * dead_cells, style="red")
    bar.append("▆" * (zero_cells - dead_cells), style="yellow")
    bar.append("·" * (width - zero_cells), style="dim")
    return bar
