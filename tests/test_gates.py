"""--fail-on gates through the real CLI: exit codes 0/1/2, each format, JUnit, and the rule engine itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reluscope.cli import app
from reluscope.errors import UsageError
from reluscope.gate import GRAMMAR, evaluate, parse_rule, site_metrics

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
CALIB = str(SAMPLES / "digits_calib.npz")
MLP_DEAD = [str(SAMPLES / "digits_mlp_dead.pt"), "--arch", f"{SAMPLES / 'architectures.py'}:digits_mlp",
            "--data", CALIB]
CNN = [str(SAMPLES / "digits_cnn.pt"), "--arch", f"{SAMPLES / 'architectures.py'}:digits_cnn", "--data", CALIB]
CNN_FAST = [*CNN, "--max-samples", "64"]  # where the verdict does not depend on the whole calibration set


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file from the checkout, no GitHub step summary from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def run(*args: str):
    return CliRunner().invoke(app, ["analyze", *args])


def fail_on(*rules: str) -> list[str]:
    out: list[str] = []
    for rule in rules:
        out += ["--fail-on", rule]
    return out


# --------------------------------------------------------------------------------------------- exit codes


def test_dead_mlp_fails_dead_fraction_exit_1() -> None:
    result = run(*MLP_DEAD, *fail_on("dead_fraction>0.1"))
    assert result.exit_code == 1, result.output
    assert "act1" in result.stdout  # the layer table is still there
    assert "dead_fraction>0.1" in result.stdout and "FAIL" in result.stdout
    assert result.stdout.index("act1") < result.stdout.index("dead_fraction>0.1")  # gate table after the layers


def test_cnn_passes_exit_0() -> None:
    result = run(*CNN, *fail_on("dead_fraction>0.5"))
    assert result.exit_code == 0, result.output
    assert "pass" in result.stdout and "all 1 gates passed" in result.stdout


def test_no_rules_no_gate_table_exit_0() -> None:
    result = run(*MLP_DEAD)
    assert result.exit_code == 0, result.output
    assert "gates" not in result.stdout


def test_json_has_gates_and_stdout_only_payload() -> None:
    result = run(*MLP_DEAD, "-f", "json", *fail_on("dead_fraction>0.1", "act*:dead_units>20", "act2:max<1"))
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # stdout holds the payload only
    gates = {g["rule"]: g for g in report["gates"]}
    layers = {l["name"]: l for l in report["layers"]}
    assert gates["dead_fraction>0.1"] == {"rule": "dead_fraction>0.1", "passed": False, "offenders": [],
                                          "value": report["summary"]["dead_fraction"]}
    scoped = gates["act*:dead_units>20"]
    assert scoped["passed"] is False
    assert scoped["offenders"] == [n for n, l in layers.items() if len(l["dead_units"]) > 20]
    assert scoped["value"] == max(len(l["dead_units"]) for l in layers.values())
    assert gates["act2:max<1"]["passed"] is True and gates["act2:max<1"]["value"] == layers["act2"]["max"]
    assert "FAIL" in result.stderr  # the gate table went to stderr


def test_scoped_rule_on_twice_called_and_functional_sites() -> None:
    result = run(*CNN_FAST, "-f", "json", *fail_on("relu#*:dead_units>0", "relu(*:dead_units>0"))
    report = json.loads(result.stdout)
    dead = {l["name"]: len(l["dead_units"]) for l in report["layers"]}
    by_rule = {g["rule"]: g for g in report["gates"]}
    assert by_rule["relu#*:dead_units>0"]["offenders"] == [n for n in ("relu#0", "relu#1") if dead[n] > 0]
    assert by_rule["relu(*:dead_units>0"]["offenders"] == [n for n in dead if n.startswith("relu(") and dead[n]]
    assert result.exit_code == (1 if any(not g["passed"] for g in report["gates"]) else 0)


def test_unscoped_site_metric_applies_to_every_site() -> None:
    result = run(*MLP_DEAD, "-f", "json", *fail_on("max>10"))
    report = json.loads(result.stdout)
    expected = [l["name"] for l in report["layers"] if l["max"] > 10]
    assert report["gates"][0]["offenders"] == expected
    assert result.exit_code == (1 if expected else 0)


@pytest.mark.parametrize("rule", [
    "dead_fraction>>0.1", "dead_fraction 0.1", "dead_fraction>", ">0.1", "dead_fraction>abc", "dead_fraction=0.1",
    ":dead_units>1", "dead_fraction>0.1%", "",
])
def test_malformed_rule_exit_2_before_the_analysis(rule: str) -> None:
    # a model path that does not exist: the rule must be refused before anything is loaded
    result = run("does-not-exist.pt", *fail_on(rule))
    assert result.exit_code == 2, result.output
    assert GRAMMAR in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_unknown_metric_exit_2_with_suggestion() -> None:
    result = run("does-not-exist.pt", *fail_on("dead_fracton>0.1"))
    assert result.exit_code == 2
    assert "unknown metric 'dead_fracton'" in result.stderr and "dead_fraction" in result.stderr
    assert GRAMMAR in result.stderr


def test_scope_matching_no_site_exit_2() -> None:
    result = run(*MLP_DEAD, *fail_on("features.*:dead_fraction>0.2"))
    assert result.exit_code == 2
    assert "matches no site" in result.stderr and "act1" in result.stderr
    assert GRAMMAR in result.stderr


def test_scope_on_model_wide_metric_exit_2() -> None:
    result = run("does-not-exist.pt", *fail_on("act*:mean_zero_fraction>0.5"))
    assert result.exit_code == 2
    assert "model-wide" in result.stderr


def test_gradient_metric_needs_gradients_exit_2() -> None:
    result = run("does-not-exist.pt", *fail_on("gradient.rms<1e-6"))
    assert result.exit_code == 2
    assert "--gradients" in result.stderr


def test_gradient_rules_with_gradients() -> None:
    result = run(*CNN_FAST, "--gradients", "-f", "json",
                 *fail_on("*:gradient.rms<0", "gradient_flow.nonfinite>0", "gradient.zero_fraction>=0"))
    report = json.loads(result.stdout)
    gates = {g["rule"]: g for g in report["gates"]}
    assert gates["*:gradient.rms<0"]["passed"] is True
    assert gates["gradient_flow.nonfinite>0"]["passed"] is True
    assert gates["gradient.zero_fraction>=0"]["passed"] is False  # every site has a zero fraction >= 0
    assert gates["gradient.zero_fraction>=0"]["offenders"] == [l["name"] for l in report["layers"]]
    assert result.exit_code == 1


# --------------------------------------------------------------------------------------------- formats


def test_output_file_json_contains_gates(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run(*MLP_DEAD, "-f", "json", "-o", str(out), *fail_on("dead_fraction>0.1"))
    assert result.exit_code == 1
    assert result.stdout == ""
    report = json.loads(out.read_text())
    assert report["gates"][0]["passed"] is False
    assert "dead_fraction>0.1" in result.stderr


def test_output_file_table_contains_gate_table(tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    result = run(*CNN_FAST, "-o", str(out), *fail_on("dead_fraction>0.9"))
    assert result.exit_code == 0
    text = out.read_text()
    assert "relu#1" in text and "dead_fraction>0.9" in text and "pass" in text
    assert text.index("relu#1") < text.index("dead_fraction>0.9")


def test_markdown_format_and_step_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = run(*MLP_DEAD, "-f", "markdown", *fail_on("dead_fraction>0.1", "act2:dead_units>1000"))
    assert result.exit_code == 1
    md = result.stdout
    assert md.startswith("### reluscope:")
    assert "| site | op | units |" in md and "| `act1` |" in md
    assert "#### Gates" in md and "❌ **fail** | `dead_fraction>0.1`" in md and "✅ pass | `act2:dead_units>1000`" in md
    assert "1 of 2 gates failed" in md
    assert summary.read_text().startswith("earlier step\n") and md in summary.read_text()
    assert "FAIL" in result.stderr  # gate table on stderr, not in the payload


def test_markdown_caps_rows() -> None:
    from reluscope.present.markdown import report_markdown

    layer = {"name": "", "op": "relu", "units": 4, "zero_fraction": 0.5, "dead_units": [], "dead_fraction": 0.0,
             "rarely_active_units": [], "min": 0.0, "max": 1.0, "saturated_fraction": None}
    layers = [dict(layer, name=f"block{i}|relu", dead_units=[0] * (i % 3), dead_fraction=(i % 3) / 4)
              for i in range(120)]
    report = {"model": {"path": "m.pt"}, "run": {}, "data": {}, "layers": layers, "gates": [],
              "summary": {"layers": 120, "units": 480, "dead_units": 0, "dead_fraction": 0.0,
                          "mean_zero_fraction": 0.5}}
    md = report_markdown(report, max_rows=50)
    rows = [line for line in md.splitlines() if line.startswith("| `block")]
    assert len(rows) == 50
    assert "block2\\|relu" in md  # pipes in names do not break the table
    assert "Showing the 50 sites" in md
    assert all("(50%)" in row for row in rows[:40])  # worst (2 of 4 dead) first


def test_quiet_json_prints_failed_gates_only(tmp_path: Path) -> None:
    result = run(*MLP_DEAD, "-q", "-f", "json", *fail_on("dead_fraction>0.1", "dead_fraction>0.9"))
    assert result.exit_code == 1
    assert "gate failed: dead_fraction>0.1" in result.stderr
    assert "dead_fraction>0.9" not in result.stderr


def test_junit_file(tmp_path: Path) -> None:
    junit = tmp_path / "gates.xml"
    result = run(*MLP_DEAD, "-q", "--junit", str(junit), *fail_on("dead_fraction>0.1", "act*:dead_units>1000",
                                                                     "act*:dead_units>20"))
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "3" and suite.get("failures") == "2" and suite.get("errors") == "0"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["dead_fraction>0.1", "act*:dead_units>1000", "act*:dead_units>20"]
    assert [c.find("failure") is not None for c in cases] == [True, False, True]
    failure = cases[2].find("failure")
    assert failure is not None and "act1" in (failure.text or "") and failure.get("type") == "GateFailed"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["model"].endswith("digits_mlp_dead.pt") and props["samples"] == "360"


def test_junit_passing_and_empty(tmp_path: Path) -> None:
    junit = tmp_path / "gates.xml"
    assert run(*CNN_FAST, "--junit", str(junit), *fail_on("dead_fraction>0.9")).exit_code == 0
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and len(suite.findall("testcase")) == 1
    assert run(*CNN_FAST, "--junit", str(junit)).exit_code == 0
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "0"


def test_junit_unwritable_folder_exit_2_before_analysis(tmp_path: Path) -> None:
    result = run("does-not-exist.pt", "--junit", str(tmp_path / "nope" / "gates.xml"))
    assert result.exit_code == 2
    assert "nope" in result.stderr


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom reluscope.cli import main\n"
            "for argv in (['--help'], ['analyze', '--help'], ['diff', '--help'], ['schema', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "bad = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    assert "--fail-on" in done.stdout and "--junit" in done.stdout


# --------------------------------------------------------------------------------------------- rule engine


def test_parse_rule_forms() -> None:
    rule = parse_rule("  features.*  :  dead_fraction >= 0.2 ")
    assert (rule.scope, rule.metric, rule.op, rule.threshold) == ("features.*", "dead_fraction", ">=", 0.2)
    assert parse_rule("dead_units!=0").scope is None
    assert parse_rule("min<-1.5e3").threshold == -1500.0
    assert parse_rule("min<.5").threshold == 0.5
    # the scope may itself hold a colon (ONNX tensor-like names): the last colon splits
    assert parse_rule("onnx::Relu_3:dead_units>0").scope == "onnx::Relu_3"
    assert parse_rule("gradient.rms<1e-8", gradients=True).metric == "gradient.rms"
    with pytest.raises(UsageError):
        parse_rule("delta.dead_units>0")  # diff-only metric
    with pytest.raises(UsageError):
        parse_rule("dead_units>0", diff=True)  # diff needs a prefix
    assert parse_rule("delta.dead_units>0", diff=True).base_metric == "dead_units"


def _layer(name: str, **fields):
    base = {"name": name, "op": "relu", "shape": [4], "unit_axis": 0, "units": 4, "samples": 10,
            "zero_fraction": 0.5, "dead_units": [], "dead_fraction": 0.0, "rarely_active_units": [],
            "rarely_active_fraction": 0.0, "dormant_units": [], "min": 0.0, "max": 1.0, "mean": 0.1, "std": 0.1,
            "nonfinite": 0, "saturated_fraction": None}
    return {**base, **fields}


def _report(*layers):
    return {"layers": list(layers), "summary": {"layers": len(layers), "units": 4 * len(layers), "dead_units": 1,
                                               "dead_fraction": 0.25, "mean_zero_fraction": 0.5, "nonfinite": 0}}


@pytest.mark.parametrize("op,threshold,offenders,value", [
    (">", 2, ["b"], 3), (">=", 2, ["a", "b"], 3), ("<", 3, ["a", "c"], 0), ("<=", 0, ["c"], 0),
    ("==", 2, ["a"], 2), ("!=", 2, ["b", "c"], 0),
])
def test_every_operator(op: str, threshold: float, offenders: list[str], value: float) -> None:
    report = _report(_layer("a", dead_units=[0, 1]), _layer("b", dead_units=[0, 1, 2]), _layer("c"))
    (gate,) = evaluate([parse_rule(f"*:dead_units{op}{threshold}")], report)
    assert gate["offenders"] == offenders
    assert gate["passed"] is (not offenders)
    assert gate["value"] == value


def test_null_values_are_skipped() -> None:
    report = _report(_layer("a", min=None, max=None, nonfinite=40), _layer("b", max=7.0))
    (maxed, sat, nonfinite) = evaluate([parse_rule("*:max>5"), parse_rule("*:saturated_fraction>0.1"),
                                        parse_rule("nonfinite>0")], report)
    assert maxed["offenders"] == ["b"] and maxed["value"] == 7.0
    assert sat == {"rule": "*:saturated_fraction>0.1", "passed": True, "offenders": [], "value": None}
    assert nonfinite["passed"] is True  # the summary's count (0 here), not the sites'


def test_gradient_metric_missing_from_report_is_usage_error() -> None:
    with pytest.raises(UsageError, match="--gradients"):
        evaluate([parse_rule("*:gradient.rms<1e-6", gradients=True)], _report(_layer("a")))
    with pytest.raises(UsageError, match="--gradients"):
        evaluate([parse_rule("gradient_flow.nonfinite>0", gradients=True)], _report(_layer("a")))


def test_site_metrics_counts_lists_and_flattens_gradient() -> None:
    metrics = site_metrics(_layer("a", dead_units=[1, 3], gradient={"rms": 0.5, "zero_fraction": None}))
    assert metrics["dead_units"] == 2 and metrics["rarely_active_units"] == 0
    assert metrics["gradient.rms"] == 0.5 and metrics["gradient.zero_fraction"] is None
    assert "unit_axis" not in metrics and "name" not in metrics


def test_gradient_metric_on_a_report_without_gradients_says_why() -> None:
    report = {**_report(_layer("a")), "gradient_flow": {"available": False, "reason": "ONNX graphs have no autograd"}}
    with pytest.raises(UsageError, match="not measured: ONNX graphs have no autograd"):
        evaluate([parse_rule("gradient.rms<1e-6", gradients=True)], report)


def test_percentile_metrics_with_dotted_names() -> None:
    report = _report(_layer("a", percentiles={"p50": 0.5, "p99.9": 9.0}), _layer("b", percentiles={"p99.9": 2.0}))
    (gate,) = evaluate([parse_rule("*:percentiles.p99.9>6")], report)
    assert gate == {"rule": "*:percentiles.p99.9>6", "passed": False, "offenders": ["a"], "value": 9.0}
    with pytest.raises(UsageError, match="no site in the report has percentiles.p99"):
        evaluate([parse_rule("percentiles.p99>1")], _report(_layer("a")))


def test_a_percentile_rule_turns_percentiles_on(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run(*CNN_FAST, "--fail-on", "*:percentiles.p99.9>1e6", "--fail-on", "percentiles.p1<0",
                 "-f", "json", "-o", str(out))
    assert result.exit_code == 0, result.output  # measured (no "no site has percentiles") and both hold
    report = json.loads(out.read_text())
    assert all(set(layer["percentiles"]) == {"p1", "p50", "p99", "p99.9"} for layer in report["layers"])
    assert [gate["passed"] for gate in report["gates"]] == [True, True]
    failing = run(*CNN_FAST, "--fail-on", "percentiles.p50>=0", "-q")
    assert failing.exit_code == 1


def test_every_percentile_is_a_listed_metric_and_no_other() -> None:
    result = run(*CNN_FAST, "--fail-on", "percentiles.p42>1")
    assert result.exit_code == 2
    listed = " ".join(result.output.split()).split("Metrics: ", 1)[1]
    for name in ("percentiles.p1", "percentiles.p50", "percentiles.p99", "percentiles.p99.9"):
        assert name in listed.split(", ") or name + "," in listed or listed.endswith(name), name
    assert "unknown metric 'percentiles.p42'" in " ".join(result.output.split())
