"""`reluscope schema`: a valid draft 2020-12 schema; every report the tool writes validates; broken ones do not."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from reluscope.cli import app
from reluscope.schema import diff_schema, report_schema

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
CALIB = str(SAMPLES / "digits_calib.npz")
ARCH = SAMPLES / "architectures.py"

# (id, CLI arguments after `analyze`): every sample-model format, plus gates and gradients
CASES = {
    "mlp_dead-state_dict-gates": [str(SAMPLES / "digits_mlp_dead.pt"), "--arch", f"{ARCH}:digits_mlp", "--data", CALIB,
                                  "--fail-on", "dead_fraction>0.1", "--fail-on", "act*:dead_units>1",
                                  "--fail-on", "act2:min<0"],
    "mlp-state_dict": [str(SAMPLES / "digits_mlp.pt"), "--arch", f"{ARCH}:digits_mlp", "--data", CALIB],
    "cnn-state_dict-gradients": [str(SAMPLES / "digits_cnn.pt"), "--arch", f"{ARCH}:digits_cnn", "--data", CALIB,
                                 "--gradients", "-n", "128", "--fail-on", "*:gradient.rms<1e-9"],
    "cnn-export": [str(SAMPLES / "digits_cnn.pt2"), "--data", CALIB],
    "mlp_dead-export": [str(SAMPLES / "digits_mlp_dead.pt2"), "--data", CALIB],
    "cnn-torchscript": [str(SAMPLES / "digits_cnn.torchscript"), "--data", CALIB, "--trust-checkpoint"],
    "cnn-synthetic": [str(SAMPLES / "digits_cnn.pt2"), "--input-shape", "1,8,8", "-n", "16"],
    "cnn-onnx": [str(SAMPLES / "digits_cnn.onnx"), "--data", CALIB],
    "mlp_dead-onnx-gradients": [str(SAMPLES / "digits_mlp_dead.onnx"), "--data", CALIB, "--gradients"],
}


def _has_onnx_loader() -> bool:
    """The ONNX path (loader + capture) is present in this checkout."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("reluscope.backends.onnx.graph", "reluscope.backends.onnx.session"))
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = report_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Real reports, written by the CLI with -o (what CI jobs and dashboards read)."""
    out: dict[str, dict[str, Any]] = {}
    folder = tmp_path_factory.mktemp("reports")
    for name, args in CASES.items():
        if "onnx" in name and not _has_onnx_loader():
            continue
        path = folder / f"{name}.json"
        result = CliRunner().invoke(app, ["analyze", *args, "-q", "--no-config", "-f", "json", "-o", str(path)])
        assert result.exit_code in (0, 1), result.output
        out[name] = json.loads(path.read_text())
    return out


def test_schema_command_prints_a_valid_2020_12_schema() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert schema == report_schema()


def test_schema_command_diff_and_output_file(tmp_path: Path) -> None:
    out = tmp_path / "diff.schema.json"
    result = CliRunner().invoke(app, ["schema", "--diff", "-o", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    schema = json.loads(out.read_text())
    Draft202012Validator.check_schema(schema)
    assert schema == diff_schema()


@pytest.mark.parametrize("name", list(CASES))
def test_real_reports_validate(name: str, reports: dict[str, dict[str, Any]],
                               validator: Draft202012Validator) -> None:
    if name not in reports:
        pytest.skip("the ONNX backend is not in this checkout")
    report = reports[name]
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
    assert report["layers"], "a sample model with no sites says nothing"


def test_gates_and_gradients_are_really_in_the_validated_reports(reports: dict[str, dict[str, Any]]) -> None:
    assert len(reports["mlp_dead-state_dict-gates"]["gates"]) == 3
    graded = reports["cnn-state_dict-gradients"]
    assert all("gradient" in layer for layer in graded["layers"])
    assert graded["gradient_flow"]["verdict"] in ("ok", "vanishing", "exploding")
    assert graded["gates"][0]["rule"] == "*:gradient.rms<1e-9"


def test_api_report_validates(validator: Draft202012Validator) -> None:
    """The Python API's report (an nn.Module, no path, no file hash) fits the same schema."""
    import torch

    import reluscope

    spec = importlib.util.spec_from_file_location("reluscope_test_arch", ARCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = reluscope.analyze(module.digits_cnn(), torch.randn(20, 1, 8, 8), percentiles=True).to_dict()
    assert report["model"]["format"] == "torch-module" and "percentiles" in report["layers"][0]
    errors = list(validator.iter_errors(report))
    assert not errors, [e.message for e in errors]
    report["layers"][0]["percentiles"]["p99"] = "high"
    assert not validator.is_valid(report)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(report: dict[str, Any]) -> None:
        target: Any = report
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(report: dict[str, Any]) -> None:
        target: Any = report
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


BROKEN: dict[str, Callable[[dict[str, Any]], None]] = {
    "missing summary": _delete(["summary"]),
    "missing layers": _delete(["layers"]),
    "missing gates": _delete(["gates"]),
    "missing layer name": _delete(["layers", 0, "name"]),
    "missing layer dead_units": _delete(["layers", 0, "dead_units"]),
    "missing summary dead_units": _delete(["summary", "dead_units"]),
    "missing model sha256": _delete(["model", "sha256"]),
    "schema_version 2": _set(["schema_version"], 2),
    "schema_version as string": _set(["schema_version"], "1"),
    "dead_fraction as string": _set(["layers", 0, "dead_fraction"], "0.5"),
    "dead_fraction above 1": _set(["layers", 0, "dead_fraction"], 1.5),
    "zero_fraction negative": _set(["layers", 0, "zero_fraction"], -0.1),
    "dead_units of floats": _set(["layers", 0, "dead_units"], [1.5]),
    "dead_units negative index": _set(["layers", 0, "dead_units"], [-1]),
    "dead_units as count": _set(["layers", 0, "dead_units"], 3),
    "summary dead_units as list": _set(["summary", "dead_units"], [1, 2]),
    "units as float": _set(["layers", 0, "units"], 4.0 + 0.5),
    "min as string": _set(["layers", 0, "min"], "0"),
    "nonfinite as bool": _set(["layers", 0, "nonfinite"], True),
    "layers as object": _set(["layers"], {}),
    "gate passed as string": _set(["gates"], [{"rule": "dead_fraction>0.1", "passed": "no", "offenders": []}]),
    "gate offenders as string": _set(["gates"], [{"rule": "x>1", "passed": False, "offenders": "act1"}]),
    "gate without rule": _set(["gates"], [{"passed": True, "offenders": []}]),
    "unknown model format": _set(["model", "format"], "keras"),
    "sha256 not hex": _set(["model", "sha256"], "xyz"),
    "unknown backend": _set(["run", "backend"], "tensorflow"),
    "negative samples": _set(["data", "samples"], -1),
    "synthetic as string": _set(["data", "synthetic"], "false"),
    "warnings as string": _set(["warnings"], "careful"),
    "tool name": _set(["tool", "name"], "other"),
    "gradient rms as string": _set(["layers", 0, "gradient"], {"rms": "big", "zero_fraction": 0.0}),
    "gradient missing zero_fraction": _set(["layers", 0, "gradient"], {"rms": 0.1}),
    "gradient_flow bad verdict": _set(["gradient_flow"], {"loss": "cross-entropy", "verdict": "meh", "nonfinite": 0,
                                                          "parameters": []}),
    "gradient_flow missing parameters": _set(["gradient_flow"], {"loss": "x", "verdict": "ok", "nonfinite": 0}),
    "gradient_flow unavailable without reason": _set(["gradient_flow"], {"available": False}),
    "parameter grad_norm as string": _set(["gradient_flow"], {
        "loss": "x", "verdict": "ok", "nonfinite": 0,
        "parameters": [{"name": "w", "grad_norm": "1", "weight_norm": 1.0, "ratio": 1.0}]}),
    "unanalysed without reason": _set(["unanalysed"], [{"name": "act9"}]),
    "report is a list": lambda report: None,
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_broken_reports_are_rejected(breakage: str, reports: dict[str, dict[str, Any]],
                                     validator: Draft202012Validator) -> None:
    report = copy.deepcopy(reports["mlp_dead-state_dict-gates"])
    assert validator.is_valid(report)
    if breakage == "report is a list":
        assert not validator.is_valid([report])
        return
    BROKEN[breakage](report)
    assert not validator.is_valid(report)


def test_optional_parts_validate(reports: dict[str, dict[str, Any]], validator: Draft202012Validator) -> None:
    report = copy.deepcopy(reports["mlp_dead-state_dict-gates"])
    report["unanalysed"] = [{"name": "act9", "reason": "not reached by the forward pass"}]
    report["gradient_flow"] = {"available": False, "reason": "ONNX models carry no gradients"}
    report["layers"][0]["tensor"] = "/act1/Relu_output_0"
    report["layers"][0]["min"] = None
    report["layers"][0]["max"] = None
    report["layers"][0]["saturated_fraction"] = 0.25
    report["model"]["path"] = None
    report["model"]["sha256"] = None
    report["summary"]["future_field"] = 1  # additive changes keep the version
    assert validator.is_valid(report), [e.message for e in validator.iter_errors(report)]
