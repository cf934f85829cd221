"""The metric catalogue is what the report builder, the JSON Schema, the gates and diff read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reluscope import diff as diff_module
from reluscope import gate, metrics
from reluscope.cli import app
from reluscope.errors import UsageError
from reluscope.schema import report_schema

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
CALIB = str(SAMPLES / "digits_calib.npz")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config file from the checkout

def test_gates_list_the_catalogue_metrics() -> None:
    site = set(metrics.gate_metrics(metrics.SITE))
    summary = set(metrics.gate_metrics(metrics.SUMMARY))
    assert set(gate.SITE_METRICS) == site and set(gate.SUMMARY_METRICS) == summary
    assert {m.name for m in metrics.SITE_FIELDS if m.help} <= site
    assert "gradient_flow.loss_mean" in summary and "percentiles.p99" in site
    with pytest.raises(UsageError) as info:
        gate.parse_rule("no_such_metric>1")
    listed = str(info.value).split("Metrics: ", 1)[1]
    assert listed == ", ".join(sorted(site | summary))


def test_schema_is_the_catalogue() -> None:
    defs = report_schema()["$defs"]
    for key, fields in (("layer", metrics.SITE_FIELDS), ("summary", metrics.SUMMARY_FIELDS)):
        assert list(defs[key]["properties"]) == [m.name for m in fields]
        assert defs[key]["required"] == [m.name for m in fields if m.required]
    gradient = metrics.SITE_BY_NAME["gradient"]
    assert list(defs["gradient"]["properties"]) == [m.name for m in gradient.members]
    assert defs["layer"]["properties"]["min"] == {"description": metrics.SITE_BY_NAME["min"].description,
                                                  "anyOf": [{"type": "number"}, {"type": "null"}]}


def test_report_fields_follow_the_catalogue_order() -> None:
    result = CliRunner().invoke(app, ["analyze", str(SAMPLES / "digits_cnn.pt2"), "--data", CALIB, "--percentiles",
                                      "--gradients", "-f", "json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    order = [m.name for m in metrics.SITE_FIELDS]
    for layer in report["layers"]:
        assert list(layer) == [name for name in order if name in layer]
    assert list(report["summary"]) == [m.name for m in metrics.SUMMARY_FIELDS]
    assert report["summary"] == metrics.summarise(report["layers"])


def test_diff_change_metrics_are_the_catalogue_ones() -> None:
    assert diff_module.CHANGE_METRICS == tuple(m.name for m in metrics.SITE_FIELDS if m.changes)
