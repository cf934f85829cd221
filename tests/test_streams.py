"""Output streams and 80-column CI logs.

The payload (the table) goes to stdout, the summary lines (sites, units, dead, worst, not analysed;
for a diff, the model-wide change) to stderr, and `-q` leaves them out. At COLUMNS=80 (a CI log) no
number is cut: the layer table widens and scrolls, a diff's cells wrap at their spaces, the summaries
wrap to 80 columns, and `--help` wraps every help text instead of cutting it to "…".
These run the real command line in a subprocess, as a CI job does (stdout and stderr are pipes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ARCHITECTURES, CALIB, SAMPLES

WIDTH = 80
ELLIPSIS = "…"


def _run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reluscope", *args], capture_output=True, text=True, timeout=300,
                          env={**env, "COLUMNS": str(WIDTH)}, cwd=cwd)


def _analyze(model: str, *extra: str) -> list[str]:
    return ["analyze", str(SAMPLES / model), "--arch", f"{ARCHITECTURES}:digits_mlp", "--data", str(CALIB),
            "--no-config", *extra]


def _close(shown: str, value: float, digits: int = 4) -> bool:
    """`shown` is `value` written in full with `digits` significant digits (not cut, not another number)."""
    number = float(shown)
    return number == value or abs(number - value) <= abs(value) * 10 ** (1 - digits)


def _lines_fit(text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= WIDTH, f"a line wider than {WIDTH} columns (cut or not wrapped): {line!r}"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> dict[str, Any]:
    """JSON reports of the dead and the healthy MLP, with every optional column (percentiles, gradients)."""
    folder = tmp_path_factory.mktemp("streams")
    out = {}
    for name in ("digits_mlp_dead.pt", "digits_mlp.pt"):
        path = folder / f"{name}.json"
        done = _run(_analyze(name, "--percentiles", "--gradients", "-f", "json", "-o", str(path), "-q"), cli_env)
        assert done.returncode == 0, done.stderr
        out[name] = path
    return out


def test_the_table_is_the_payload_and_the_summary_goes_to_stderr(cli_env: dict[str, str],
                                                                  reports: dict[str, Path]) -> None:
    report = json.loads(reports["digits_mlp_dead.pt"].read_text())
    done = _run(_analyze("digits_mlp_dead.pt", "--percentiles", "--gradients"), cli_env)
    assert done.returncode == 0, done.stderr
    s = report["summary"]
    summary = f"{s['layers']} sites, {s['units']} units: {s['dead_units']} dead ({100 * s['dead_fraction']:.1f}%)"
    assert summary not in done.stdout and "worst:" not in done.stdout
    flat = " ".join(done.stderr.split())  # wrapped to 80 columns: compare without the line breaks
    assert summary in flat and "worst: act1, act2" in flat
    assert "act1" in done.stdout and "gradient flow" in done.stdout  # the payload: the tables
    _lines_fit(done.stderr)

    quiet = _run(_analyze("digits_mlp_dead.pt", "--percentiles", "--gradients", "-q"), cli_env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "act1" in quiet.stdout and "gradient flow" in quiet.stdout  # -q changes stderr only


def test_summaries_go_to_stderr_for_every_format(cli_env: dict[str, str], tmp_path: Path) -> None:
    for extra in (["-f", "json"], ["-f", "markdown"], ["-o", str(tmp_path / "table.txt")]):
        done = _run(_analyze("digits_mlp_dead.pt", *extra), cli_env)
        assert done.returncode == 0, done.stderr
        assert "sites, 192 units" in done.stderr and "worst:" in done.stderr, extra
        quiet = _run(_analyze("digits_mlp_dead.pt", *extra, "-q"), cli_env)
        assert quiet.stderr == "", (extra, quiet.stderr)
    # the -o file is a whole document: its summary stays in it
    assert "sites, 192 units" in (tmp_path / "table.txt").read_text()


def test_at_80_columns_no_number_of_the_report_is_cut(cli_env: dict[str, str], reports: dict[str, Path]) -> None:
    """Every number the table shows, of every site, is there in full: the rows are parsed and
    compared with the JSON report of the same model and data."""
    report = json.loads(reports["digits_mlp_dead.pt"].read_text())
    done = _run(_analyze("digits_mlp_dead.pt", "--percentiles", "--gradients"), cli_env)
    assert done.returncode == 0, done.stderr
    assert ELLIPSIS not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if "site" in line and "zero %" in line)
    labels = [cell.strip() for cell in header.strip("┃").split("┃")]
    for layer in report["layers"]:
        row = next(line for line in lines if line.startswith(f"│ {layer['name']} "))
        cells = dict(zip(labels, (cell.strip() for cell in row.strip("│").split("│"))))
        assert cells["units"] == str(layer["units"])
        assert cells["zero %"] == f"{100 * layer['zero_fraction']:.1f}"
        dead = len(layer["dead_units"])
        assert cells["dead"] == (f"{dead} ({100 * dead / layer['units']:.0f}%)" if dead else "0")
        assert cells["rarely active"].split(" ")[0] == str(len(layer["rarely_active_units"]))
        for label, value in (("min", layer["min"]), ("max", layer["max"]), ("p50", layer["percentiles"]["p50"]),
                             ("p99.9", layer["percentiles"]["p99.9"]), ("grad rms", layer["gradient"]["rms"])):
            assert _close(cells[label], value, 3 if "e" in cells[label] else 4), (label, cells[label], value)
    for param in report["gradient_flow"]["parameters"]:
        if len(param.get("shape", ())) >= 2 and param["grad_norm"] is not None:
            row = next(line for line in lines if line.startswith(f"│ {param['name']} "))
            shown = [cell.strip() for cell in row.strip("│").split("│")]
            assert _close(shown[1], param["grad_norm"], 3) and _close(shown[2], param["ratio"], 3), row


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]\d+)?", text))


def test_a_diff_at_80_columns_wraps_its_cells_and_cuts_no_number(cli_env: dict[str, str],
                                                                 reports: dict[str, Path]) -> None:
    from reluscope.present.cells import format_measure

    base, new = (json.loads(reports[name].read_text()) for name in ("digits_mlp.pt", "digits_mlp_dead.pt"))
    done = _run(["diff", str(reports["digits_mlp.pt"]), str(reports["digits_mlp_dead.pt"]), "--no-config"], cli_env)
    assert done.returncode == 1, done.stderr  # more dead units: the default gate fails
    assert ELLIPSIS not in done.stdout + done.stderr
    _lines_fit(done.stdout)
    _lines_fit(done.stderr)
    shown = _tokens(done.stdout)
    for b, n in zip(base["layers"], new["layers"]):
        expected = {str(len(b["dead_units"])), str(len(n["dead_units"])), f"{len(n['dead_units']) - len(b['dead_units']):+d}",
                    f"{100 * b['zero_fraction']:.1f}", f"{100 * n['zero_fraction']:.1f}",
                    f"{100 * (n['zero_fraction'] - b['zero_fraction']):+.1f}",
                    format_measure(b["max"]), format_measure(n["max"]), format_measure(n["min"])}
        assert expected <= shown, (b["name"], expected - shown)
    summary = f"model: dead units {base['summary']['dead_units']} → {new['summary']['dead_units']}"
    assert summary in " ".join(done.stderr.split()) and summary not in done.stdout
    quiet = _run(["diff", str(reports["digits_mlp.pt"]), str(reports["digits_mlp_dead.pt"]), "--no-config", "-q"],
                 cli_env)
    assert "model: dead units" not in quiet.stdout + quiet.stderr


def _commands() -> dict[str, Any]:
    import typer.main

    from reluscope.cli import app

    group = typer.main.get_command(app)
    return {"": group, **group.commands}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ["", "analyze", "diff", "schema", "report"])
def test_help_at_80_columns_wraps_every_text(command: str, cli_env: dict[str, str]) -> None:
    done = _run([command, "--help"] if command else ["--help"], cli_env)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert ELLIPSIS not in text
    _lines_fit(text)
    # every help text is there whole: without the box and the spaces, it is one run of characters
    flat = re.sub(r"[\s│╭╮╰╯─]", "", text)
    for param in _commands()[command].params:
        help_text = getattr(param, "help", None)
        if help_text:
            assert re.sub(r"\s", "", help_text.replace("\\[", "[")) in flat, (param.name, help_text)
