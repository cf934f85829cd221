"""HTML reports through the real CLI (`analyze --html`, `reluscope report`), on reports of the sample
models; the page opened in headless Chromium with the network blocked; the terminal bars."""

from __future__ import annotations

import builtins
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from reluscope.cli import app
from reluscope.present.table import layers_table, render_text

from conftest import arch_spec

runner = CliRunner()
RUN = Path(__file__).resolve().parents[1] / "sample_models" / "run"
EPOCHS = ("00", "01", "03", "06", "12")
MAX_BYTES = 5_000_000


def _analyze(model: Path, factory: str, calib: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = runner.invoke(app, ["analyze", str(model), "--arch", arch_spec(factory), "--data", str(calib),
                                 "-f", "json", "-o", str(out), "-q", *extra])
    assert result.exit_code in (0, 1), result.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path, calib_path: Path) -> dict[str, Path]:
    """JSON reports of the sample models (with gradients, percentiles and a failing gate) and of the
    training run's checkpoints, and `analyze --html` pages of two of them."""
    folder = tmp_path_factory.mktemp("reports")
    out: dict[str, Path] = {}
    for name, factory in (("digits_cnn", "digits_cnn"), ("digits_mlp_dead", "digits_mlp")):
        out[name] = folder / f"{name}.json"
        _analyze(samples_dir / f"{name}.pt", factory, calib_path, out[name], "--gradients", "--percentiles",
                 "--fail-on", "dead_fraction>0.05", "--html", str(folder / f"{name}.html"))
        out[f"{name}.html"] = folder / f"{name}.html"
    for epoch in EPOCHS:
        out[f"epoch{epoch}"] = folder / f"epoch{epoch}.json"
        _analyze(RUN / f"digits_mlp_epoch{epoch}.pt", "digits_mlp", calib_path, out[f"epoch{epoch}"])
    return out


def _page_data(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="reluscope-page">(.*?)</script>', page, re.S)
    assert match, "no page data"
    return json.loads(match.group(1))


# ----------------------------------------------------------------------------- the report carries per-unit data
def test_report_has_unit_active_fractions_consistent_with_dead_and_rare(reports: dict[str, Path]) -> None:
    report = json.loads(reports["digits_mlp_dead"].read_text())
    for layer in report["layers"]:
        fractions = layer["unit_active_fraction"]
        assert len(fractions) == layer["units"]
        assert [u for u, f in enumerate(fractions) if f == 0] == layer["dead_units"]
        assert [u for u, f in enumerate(fractions) if 0 < f < report["run"]["rare_threshold"]] == \
            layer["rarely_active_units"]
        # the mean active fraction over units is the site's active share of outputs
        assert sum(fractions) / len(fractions) == pytest.approx(1 - layer["zero_fraction"], abs=1e-3)


def test_report_with_unit_fractions_validates_against_the_schema(reports: dict[str, Path]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from reluscope.schema import report_schema

    for key in ("digits_cnn", "epoch12"):
        jsonschema.validate(json.loads(reports[key].read_text()), report_schema())


# ----------------------------------------------------------------------------- the page
def test_analyze_html_writes_a_self_contained_page_from_the_report(reports: dict[str, Path]) -> None:
    page = reports["digits_cnn.html"].read_text()
    report = json.loads(reports["digits_cnn"].read_text())
    assert page.startswith("<!DOCTYPE html>") and len(page.encode()) < MAX_BYTES
    # nothing is fetched: no external scripts, styles or links to load
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)=', page)
    assert "https://cdn" not in page
    data = _page_data(page)
    depth = data["depth"][0]
    names = [l["name"] for l in report["layers"]]
    assert depth["activity"]["data"][0]["x"] == names
    zero = next(t for t in depth["activity"]["data"] if t["name"].startswith("zero fraction"))
    assert zero["y"] == [l["zero_fraction"] for l in report["layers"]]
    assert {t["name"] for t in depth["ranges"]["data"]} >= {"max", "p99.9", "p99", "p50"}
    assert depth["grad_sites"]["data"][0]["y"] == [l["gradient"]["rms"] for l in report["layers"]]
    assert depth["grad_params"]["layout"]["shapes"]  # the vanishing and exploding bands
    strip = depth["units"]
    cells = [v for row in strip["data"][0]["z"] for v in row if v is not None]
    assert cells == [f for l in report["layers"] for f in l["unit_active_fraction"]]
    assert depth["saturation"] is None  # ReLU only: no bounded op
    # gates and warnings at the top, a table with the same numbers
    top = page.index('id="verdict"')
    assert top < page.index('id="depth"') and "dead_fraction&gt;0.05" in page[top:page.index('id="depth"')]
    for layer in report["layers"]:
        assert f"<td>{layer['name']}</td>" in page
        assert f"{100 * layer['zero_fraction']:.2f}%" in page


def test_report_command_reads_a_sequence_and_diffs_two(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run.html"
    files = [str(reports[f"epoch{e}"]) for e in EPOCHS]
    result = runner.invoke(app, ["report", *files, "--html", str(out), "--label", "epoch 0", "--label", "epoch 1",
                                 "--label", "epoch 3", "--label", "epoch 6", "--label", "epoch 12"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    data = _page_data(page)
    loaded = [json.loads(Path(f).read_text()) for f in files]
    assert data["labels"] == ["epoch 0", "epoch 1", "epoch 3", "epoch 6", "epoch 12"]
    dead = data["sequence"]["seq_dead"]["data"][0]
    assert dead["y"] == ["act1", "act2"]
    assert dead["z"][0] == [r["layers"][0]["dead_fraction"] for r in loaded]
    # which layer died when: act1 loses most of its units in the first epoch
    assert dead["z"][0][1] - dead["z"][0][0] > 0.25
    first_last = data["diffs"][0]
    assert first_last["label"] == "epoch 0 → epoch 12"
    died = first_last["diff_bars"]["data"][0]["y"]
    before = set(loaded[0]["layers"][0]["dead_units"])
    after = set(loaded[-1]["layers"][0]["dead_units"])
    assert died[0] == len(after - before)
    assert len(data["diffs"]) == 1 + 4  # first -> last, then each consecutive pair
    assert "units that revived" in page and len(page.encode()) < MAX_BYTES


def test_report_command_refuses_bad_input_in_one_line(reports: dict[str, Path], tmp_path: Path) -> None:
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text("{}")
    for args in (["report", str(not_a_report), "--html", str(tmp_path / "a.html")],
                 ["report", str(reports["epoch00"]), "--html", str(tmp_path / "missing" / "a.html")],
                 ["report", str(reports["epoch00"]), "--html", str(tmp_path / "a.html"), "--label", "a",
                  "--label", "b"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "a.html").exists()


def test_without_plotly_html_exits_2_saying_how_to_install(reports: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, samples_dir: Path,
                                                           calib_path: Path) -> None:
    real_import = builtins.__import__

    def no_plotly(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "plotly" or name.startswith("plotly."):
            raise ImportError("No module named 'plotly'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plotly)
    for args in (["report", str(reports["epoch00"]), "--html", str(tmp_path / "a.html")],
                 ["analyze", str(samples_dir / "digits_mlp.pt"), "--arch", arch_spec("digits_mlp"), "--data",
                  str(calib_path), "--html", str(tmp_path / "b.html")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == 'error: HTML reports need Plotly: pip install "reluscope[html]"'
        assert result.stdout == ""  # analyze refused before analysing
    assert not list(tmp_path.glob("*.html"))


# ----------------------------------------------------------------------------- the terminal bars
def test_table_bars_show_dead_and_zero_share(reports: dict[str, Path]) -> None:
    report = json.loads(reports["digits_mlp_dead"].read_text())
    text = render_text(layers_table(report, bars=True), width=200)
    rows = [line for line in text.splitlines() if line.startswith("│ act")]
    assert len(rows) == 2
    for row, layer in zip(rows, report["layers"]):
        bar = next(cell.strip() for cell in row.split("│") if set(cell.strip()) <= set("█▆·") and cell.strip())
        assert len(bar) == 12
        assert bar.count("█") == round(12 * layer["dead_fraction"])
        assert bar.count("█") + bar.count("▆") == round(12 * layer["zero_fraction"])
    assert "zero/dead" in text and "zero/dead" not in render_text(layers_table(report), width=200)


def test_bars_only_on_a_terminal_and_off_with_no_bars(samples_dir: Path, calib_path: Path) -> None:
    args = ["analyze", str(samples_dir / "digits_mlp_dead.pt"), "--arch", arch_spec("digits_mlp"), "--data",
            str(calib_path), "-q", "-n", "64"]
    piped = runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert piped.exit_code == 0 and "zero/dead" not in piped.stdout  # not a terminal
    code = "import sys; from reluscope.cli import main; main(sys.argv[1:])"
    # Rich treats stdout as a terminal under TTY_COMPATIBLE=1, as it would on a real one
    env = {"TTY_COMPATIBLE": "1", "COLUMNS": "200", "NO_COLOR": "1", "PATH": os.environ.get("PATH", ""),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    on_tty = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    assert on_tty.returncode == 0, on_tty.stderr
    assert "zero/dead" in on_tty.stdout and "█" in on_tty.stdout
    off = subprocess.run([sys.executable, "-c", code, *args, "--no-bars"], capture_output=True, text=True, env=env)
    assert off.returncode == 0 and "zero/dead" not in off.stdout


# ----------------------------------------------------------------------------- in a real browser
def test_page_renders_in_headless_chromium_offline(reports: dict[str, Path], tmp_path: Path) -> None:
    from browser import Browser, find_chromium, load_report_page

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed (.ci/run tries `apt-get install "
                    "chromium`); the HTML page was not opened in a browser")
    sequence = tmp_path / "run.html"
    result = runner.invoke(app, ["report", *[str(reports[f"epoch{e}"]) for e in EPOCHS], "--html", str(sequence)])
    assert result.exit_code == 0, result.output
    expected = {
        reports["digits_cnn.html"]: {"activity", "ranges", "grad_sites", "grad_params", "units"},
        sequence: {"activity", "ranges", "units", "seq_dead", "seq_zero", "seq_summary", "diff_bars", "diff_units"},
    }
    with Browser(chromium) as browser:
        for page, charts in expected.items():
            state = load_report_page(browser, page)
            assert state["error"] is None, state
            assert browser.errors() == []
            outside = [u for u in browser.requests() if not u.startswith(("file:", "data:", "blob:", "about:"))]
            assert outside == []
            drawn = {c["name"]: c for c in state["charts"] if not c["empty"]}
            assert set(drawn) == charts
            for name, chart in drawn.items():
                assert chart["svg"] >= 1 and chart["width"] > 600 and chart["height"] > 100, chart
                marks = chart["bars"] + chart["points"] + chart["lines"] + chart["heatmap"]
                assert marks > 0, chart
            shot = tmp_path / f"{page.stem}.png"
            browser.screenshot(shot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
            # switching the report shown redraws the charts by depth from that report
            if page == sequence:
                count = browser.evaluate("""(async () => {
                    const select = document.getElementById('report-select');
                    select.value = '0'; select.dispatchEvent(new Event('change'));
                    await new Promise(r => setTimeout(r, 500));
                    return document.querySelector('[data-fig=activity] .barlayer .point path') !== null;
                })()""")
                assert count and browser.errors() == []
