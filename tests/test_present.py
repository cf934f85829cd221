"""Presentation: the table and markdown show the same per-site columns, from the metric catalogue,
with the same cell text; formats are objects behind one interface."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from reluscope import metrics
from reluscope.cli import app
from reluscope.present import OutputFormat, to_format
from reluscope.present.cells import COLUMNS, offender_list, site_columns, worst_first

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
CALIB = str(SAMPLES / "digits_calib.npz")

# Four units always far below zero (GELU output ~0: tau-dormant), four always above it.
DORMANT_ARCH = '''
import torch
from torch import nn

class HalfDormant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x.flatten(1)))

def build():
    model = HalfDormant()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([-8.0] * 4 + [2.0] * 4))
    return model
'''


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def _analyze(*args: str) -> Any:
    result = CliRunner().invoke(app, ["analyze", *args, "-q"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result


def _table_rows(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┃ site"))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("└"))
    header = lines[start]
    rows = [line for line in lines[start:end] if line.startswith("│")]  # the sites table only
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in rows]
    return [c.strip() for c in header.strip("┃").split("┃")], {row[0]: row for row in cells}


def _markdown_rows(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| site |"))
    rows = [line for line in lines if line.startswith("| `")]
    cells = [[c.strip().strip("`").replace("**", "") for c in line.strip("|").split(" | ")] for line in rows]
    return [c.strip() for c in header.strip("|").split("|")], {row[0]: row for row in cells}


def _assert_same_columns(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    table_header, table_rows = _table_rows(_analyze(*args).stdout)
    md_header, md_rows = _markdown_rows(_analyze(*args, "-f", "markdown").stdout)
    assert table_header == md_header
    assert table_rows == md_rows  # same sites, same cell text (min/max/percentiles alike)
    return table_header, table_rows


def test_markdown_has_the_table_columns_with_percentiles_and_gradients() -> None:
    header, rows = _assert_same_columns([str(SAMPLES / "digits_cnn.pt2"), "--data", CALIB, "--percentiles",
                                         "--gradients"])
    assert header == ["site", "op", "units", "zero %", "dead", "rarely active", "min", "max", "p50", "p99.9",
                      "grad rms"]
    assert len(rows) == 3


def test_markdown_has_the_dormant_column(tmp_path: Path) -> None:
    arch = tmp_path / "dormant.py"
    arch.write_text(DORMANT_ARCH)
    namespace: dict[str, Any] = {}
    exec(compile(DORMANT_ARCH, str(arch), "exec"), namespace)  # noqa: S102 - our own test source
    weights = tmp_path / "dormant.pt"
    torch.save(namespace["build"]().state_dict(), weights)
    header, rows = _assert_same_columns([str(weights), "--arch", f"{arch}:build", "--data", CALIB])
    assert "dormant" in header and "p50" not in header
    (row,) = rows.values()
    assert row[header.index("dormant")] == "4 (50%)"


def test_optional_columns_follow_the_sites() -> None:
    base = {"name": "a", "op": "relu", "units": 4, "zero_fraction": 0.5, "dead_units": [], "dead_fraction": 0.0,
            "rarely_active_units": [], "dormant_units": [], "min": 0.0, "max": 1.0, "saturated_fraction": None}
    assert [c.label for c in site_columns([base])] == ["units", "zero %", "dead", "rarely active", "min", "max"]
    other = dict(base, saturated_fraction=0.0, dormant_units=[1], percentiles={"p50": 0.2},
                 gradient={"rms": None, "zero_fraction": None})
    assert [c.label for c in site_columns([base, other])] == [c.label for c in COLUMNS]


def test_shared_cells() -> None:
    assert offender_list([f"s{i}" for i in range(9)], 6) == "s0, s1, s2, s3, s4, s5 and 3 more"
    layers = [{"name": n, "dead_fraction": d, "zero_fraction": z} for n, d, z in
              (("a", 0.1, 0.9), ("b", 0.5, 0.1), ("c", 0.1, 0.95))]
    assert [layer["name"] for layer in worst_first(layers)] == ["b", "c", "a"]


def test_columns_are_catalogue_metrics() -> None:
    labelled = {path for path, m in metrics.flatten(metrics.SITE_FIELDS) if m.label}
    assert {c.path for c in COLUMNS} == labelled  # every column is a catalogue metric, and every labelled one shows


def test_output_format_objects() -> None:
    doc = {"kind": "diff", "gates": []}
    assert json.loads(to_format(OutputFormat.json).render(doc)) == doc
    assert to_format(OutputFormat.table).terminal and not to_format(OutputFormat.markdown).terminal
    assert to_format(OutputFormat.markdown).step_summary
