"""`reluscope diff BASE.json NEW.json` through the real CLI, on reports of the sample models."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from reluscope.cli import app
from reluscope.gate import GRAMMAR
from reluscope.schema import diff_schema

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
CALIB = str(SAMPLES / "digits_calib.npz")
ARCH = SAMPLES / "architectures.py"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def _analyze(path: Path, *args: str) -> Path:
    result = CliRunner().invoke(app, ["analyze", *args, "--no-config", "-q", "-f", "json", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("diff-reports")
    return {
        "healthy": _analyze(folder / "healthy.json", str(SAMPLES / "digits_mlp.pt"), "--arch", f"{ARCH}:digits_mlp",
                            "--data", CALIB),
        "dead": _analyze(folder / "dead.json", str(SAMPLES / "digits_mlp_dead.pt"), "--arch",
                         f"{ARCH}:digits_mlp", "--data", CALIB),
        "cnn": _analyze(folder / "cnn.json", str(SAMPLES / "digits_cnn.pt2"), "--data", CALIB),
    }


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def diff(*args: str):
    return CliRunner().invoke(app, ["diff", *args])


def test_more_dead_units_fails_by_default(reports: dict[str, Path]) -> None:
    result = diff(str(reports["healthy"]), str(reports["dead"]))
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "act1" in out and "act2" in out and "changed" in out
    assert "delta.dead_units>0" in out and "FAIL" in out
    base, new = load(reports["healthy"]), load(reports["dead"])
    # the model-wide summary line is not the payload: it goes to stderr
    summary = f"model: dead units {base['summary']['dead_units']} → {new['summary']['dead_units']}"
    assert summary in result.stderr and summary not in out


def test_fewer_dead_units_passes(reports: dict[str, Path]) -> None:
    result = diff(str(reports["dead"]), str(reports["healthy"]))
    assert result.exit_code == 0, result.output
    assert "all 2 gates passed" in result.stdout


def test_identical_reports_pass_unchanged(reports: dict[str, Path]) -> None:
    result = diff(str(reports["dead"]), str(reports["dead"]), "-f", "json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert {s["status"] for s in document["sites"]} == {"unchanged"}
    assert all(s["newly_dead"] == [] and s["revived"] == [] for s in document["sites"])


def test_json_matches_sites_by_name(reports: dict[str, Path]) -> None:
    result = diff(str(reports["healthy"]), str(reports["dead"]), "-f", "json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)  # stdout: the payload only
    assert "FAIL" in result.stderr
    Draft202012Validator(diff_schema()).validate(document)
    base = {l["name"]: l for l in load(reports["healthy"])["layers"]}
    new = {l["name"]: l for l in load(reports["dead"])["layers"]}
    assert [s["name"] for s in document["sites"]] == list(new)
    for site in document["sites"]:
        b, n = base[site["name"]], new[site["name"]]
        assert site["base"]["dead_units"] == len(b["dead_units"])
        assert site["delta"]["dead_units"] == len(n["dead_units"]) - len(b["dead_units"])
        assert site["delta"]["zero_fraction"] == pytest.approx(n["zero_fraction"] - b["zero_fraction"])
        assert site["delta"]["max"] == pytest.approx(n["max"] - b["max"])
        assert site["newly_dead"] == sorted(set(n["dead_units"]) - set(b["dead_units"]))
        assert site["revived"] == sorted(set(b["dead_units"]) - set(n["dead_units"]))
    assert document["added"] == [] and document["removed"] == []
    summary = document["summary"]
    assert summary["delta"]["dead_units"] == summary["new"]["dead_units"] - summary["base"]["dead_units"]
    assert [g["rule"] for g in document["gates"]] == ["delta.dead_units>0", "*:delta.dead_units>0"]


def test_added_and_removed_sites(reports: dict[str, Path]) -> None:
    result = diff(str(reports["healthy"]), str(reports["cnn"]), "-f", "json")
    document = json.loads(result.stdout)
    Draft202012Validator(diff_schema()).validate(document)
    cnn_sites = [l["name"] for l in load(reports["cnn"])["layers"]]
    assert document["added"] == cnn_sites
    assert document["removed"] == ["act1", "act2"]
    for site in document["sites"]:
        assert site["delta"] is None
        assert (site["base"] is None) == (site["status"] == "added")
    # no site is in both: only the model-wide dead-unit count gates
    more = load(reports["cnn"])["summary"]["dead_units"] > load(reports["healthy"])["summary"]["dead_units"]
    assert result.exit_code == (1 if more else 0)
    table = diff(str(reports["healthy"]), str(reports["cnn"]))
    assert "added" in table.stdout and "removed" in table.stdout


def test_site_regression_fails_even_when_the_total_does_not_grow(reports: dict[str, Path], tmp_path: Path) -> None:
    base = load(reports["healthy"])
    new = copy.deepcopy(base)
    layers = {l["name"]: l for l in new["layers"]}
    moved = layers["act1"]["dead_units"][:2]
    layers["act1"]["dead_units"] = layers["act1"]["dead_units"][2:]
    free = [u for u in range(layers["act2"]["units"]) if u not in layers["act2"]["dead_units"]][:2]
    layers["act2"]["dead_units"] = sorted(layers["act2"]["dead_units"] + free)
    assert len(moved) == 2
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(new))
    result = diff(str(reports["healthy"]), str(path), "-f", "json")
    assert result.exit_code == 1
    gates = {g["rule"]: g for g in json.loads(result.stdout)["gates"]}
    assert gates["delta.dead_units>0"]["passed"] is True and gates["delta.dead_units>0"]["value"] == 0
    assert gates["*:delta.dead_units>0"]["offenders"] == ["act2"]
    site = next(s for s in json.loads(result.stdout)["sites"] if s["name"] == "act2")
    assert site["newly_dead"] == free


def test_fail_on_delta_rules_replace_the_default(reports: dict[str, Path]) -> None:
    healthy, dead = str(reports["healthy"]), str(reports["dead"])
    result = diff(healthy, dead, "--fail-on", "delta.zero_fraction>0.05", "-f", "json")
    assert result.exit_code == 1
    (gate,) = json.loads(result.stdout)["gates"]
    assert gate["rule"] == "delta.zero_fraction>0.05" and gate["offenders"] == ["act1", "act2"]
    # a loose rule passes although dead units grew: the given rules replace the default gate
    assert diff(healthy, dead, "--fail-on", "delta.zero_fraction>0.9").exit_code == 0
    assert diff(healthy, dead, "--fail-on", "act2:delta.dead_units>1000").exit_code == 0
    assert diff(healthy, dead, "--fail-on", "new.dead_fraction>0.5").exit_code == 1
    assert diff(healthy, dead, "--fail-on", "base.dead_fraction>0.5").exit_code == 0
    assert diff(healthy, dead, "--fail-on", "delta.mean_zero_fraction>0.1").exit_code == 1


@pytest.mark.parametrize("rule,message", [
    ("dead_units>0", "needs a prefix"),
    ("delta.dead_unit>0", "unknown metric"),
    ("features.*:delta.dead_units>0", "matches no site"),
    ("delta.dead_units>>0", "malformed"),
    ("act*:delta.mean_zero_fraction>0", "model-wide"),
])
def test_bad_rules_exit_2(reports: dict[str, Path], rule: str, message: str) -> None:
    result = diff(str(reports["healthy"]), str(reports["dead"]), "--fail-on", rule)
    assert result.exit_code == 2
    assert message in result.stderr and GRAMMAR in result.stderr
    assert "Traceback" not in result.output


def test_bad_inputs_exit_2(reports: dict[str, Path], tmp_path: Path) -> None:
    good = str(reports["healthy"])
    good_text = reports["healthy"].read_text()
    not_json = tmp_path / "notes.json"
    not_json.write_text("hello")
    not_report = tmp_path / "other.json"
    not_report.write_text('{"a": 1}')
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**load(reports["healthy"]), "schema_version": 99}))
    nan = tmp_path / "nan.json"
    nan.write_text(good_text.replace('"mean": ', '"mean": NaN, "x": ', 1))
    for other, message in ((tmp_path / "missing.json", "no such file"), (not_json, "is not JSON"),
                           (nan, "NaN is not valid JSON"),
                           (not_report, "not a reluscope report"), (future, "schema_version 99"),
                           (tmp_path, "is a folder")):
        result = diff(good, str(other))
        assert result.exit_code == 2, (other, result.output)
        assert message in result.stderr
        assert "Traceback" not in result.output


def test_markdown_and_step_summary(reports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = diff(str(reports["healthy"]), str(reports["dead"]), "-f", "markdown")
    assert result.exit_code == 1
    md = result.stdout
    assert md.startswith("### reluscope diff:")
    assert "| `act1` | changed |" in md and "newly dead" in md
    assert "❌ **fail** | `delta.dead_units>0`" in md
    assert summary.read_text().strip() == md.strip()


def test_output_file_and_junit(reports: dict[str, Path], tmp_path: Path) -> None:
    out, junit = tmp_path / "diff.txt", tmp_path / "diff.xml"
    result = diff(str(reports["healthy"]), str(reports["dead"]), "-o", str(out), "--junit", str(junit), "-q")
    assert result.exit_code == 1
    assert result.stdout == ""
    text = out.read_text()
    assert "act1" in text and "*:delta.dead_units>0" in text
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "2"
    assert {c.get("classname") for c in suite.findall("testcase")} == {"reluscope.diff"}
    assert "gate failed" in result.stderr


def test_reports_without_sites(tmp_path: Path, reports: dict[str, Path]) -> None:
    empty = {**load(reports["healthy"]), "layers": []}
    empty["summary"] = {**empty["summary"], "layers": 0, "units": 0, "dead_units": 0, "dead_fraction": 0.0}
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(empty))
    result = diff(str(path), str(path), "-f", "json")
    assert result.exit_code == 0, result.output
    assert [g["rule"] for g in json.loads(result.stdout)["gates"]] == ["delta.dead_units>0"]
