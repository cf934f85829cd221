"""The Rich table never hides what it reports: on a narrow console numbers are not cut to "5.…"."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from reluscope.cli import app


def test_narrow_console_shows_every_cell_in_full(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    model = str(samples_dir / "digits_cnn.pt2")
    common = ["analyze", model, "--data", str(calib_path), "--percentiles", "--gradients", "-q"]
    table = CliRunner().invoke(app, common, env={"COLUMNS": "60", "NO_COLOR": "1"})
    report = CliRunner().invoke(app, [*common, "-f", "json"])
    assert table.exit_code == 0 and report.exit_code == 0, table.output
    site_rows = [line for line in table.stdout.splitlines() if line.startswith("│ relu")]
    assert len(site_rows) == 3 and not any("…" in row for row in site_rows)
    for layer in json.loads(report.stdout)["layers"]:
        assert layer["name"] in table.stdout
        assert f"{layer['max']:.4g}" in table.stdout
        assert f"{layer['percentiles']['p99.9']:.4g}" in table.stdout
        assert f"{layer['gradient']['rms']:.2e}" in table.stdout
