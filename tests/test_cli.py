"""The command line through its real entry points: typer's CliRunner on reluscope.cli.app, plus
subprocess runs of `python -m reluscope` and of the installed `reluscope` console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from reluscope.cli import app

from conftest import VENV_BIN, arch_spec

runner = CliRunner()

TOP_LEVEL = {  # the JSON contract: key -> type
    "schema_version": int, "tool": dict, "model": dict, "data": dict, "run": dict, "layers": list, "summary": dict,
    "gates": list,
}
ADDITIVE = {"warnings": list, "unanalysed": list, "gradient_flow": dict}
LAYER_KEYS = {
    "name": str, "op": str, "shape": list, "unit_axis": int, "units": int, "zero_fraction": float,
    "dead_units": list, "dead_fraction": float, "rarely_active_units": list, "dormant_units": list,
    "min": (int, float), "max": (int, float), "mean": (int, float), "std": (int, float), "nonfinite": int,
}
SUMMARY_KEYS = {"layers": int, "units": int, "dead_units": int, "dead_fraction": float, "mean_zero_fraction": float}


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def mlp_args(samples_dir: Path, calib: Path, *extra: Any) -> list[Any]:
    return ["analyze", samples_dir / "digits_mlp_dead.pt", "--arch", arch_spec("digits_mlp"), "--data", calib, *extra]


def assert_clean_failure(result: Any, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""  # stdout carries only the payload
    assert result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) <= 3  # one message (soft-wrapped at most)


# ----------------------------------------------------------------------------- success paths
def test_table_names_every_site(samples_dir: Path, calib_path: Path) -> None:
    result = invoke("analyze", samples_dir / "digits_cnn.pt", "--arch", arch_spec("digits_cnn"), "--data", calib_path)
    assert result.exit_code == 0, result.output
    for site in ("relu#0", "relu()", "relu#1"):
        assert site in result.stdout
    assert "22 (34%)" in result.stdout  # relu#1: 22 of 64 units dead (manifest.json)


def test_json_report_follows_the_contract(samples_dir: Path, calib_path: Path, tmp_path: Path,
                                          manifest: dict) -> None:
    out = tmp_path / "report.json"
    result = invoke(*mlp_args(samples_dir, calib_path, "--format", "json", "-o", out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the payload went to the file
    assert "report written to" in result.stderr
    report = json.loads(out.read_text())
    assert set(TOP_LEVEL) <= set(report) <= set(TOP_LEVEL) | set(ADDITIVE)
    for key, kind in {**TOP_LEVEL, **ADDITIVE}.items():
        if key in report:
            assert isinstance(report[key], kind), key
    assert report["schema_version"] == 1
    assert report["tool"]["name"] == "reluscope" and isinstance(report["tool"]["version"], str)
    assert report["model"]["format"] == "torch-state-dict"
    assert report["model"]["path"].endswith("digits_mlp_dead.pt")
    assert len(report["model"]["sha256"]) == 64
    assert report["data"] == {"source": str(calib_path), "samples": 360, "synthetic": False}
    assert report["run"]["backend"] == "torch" and report["run"]["device"] == "cpu"
    assert isinstance(report["run"]["seconds"], float)
    for key, kind in SUMMARY_KEYS.items():
        assert isinstance(report["summary"][key], kind), key
    assert [layer["name"] for layer in report["layers"]] == ["act1", "act2"]
    for layer in report["layers"]:
        for key, kind in LAYER_KEYS.items():
            assert isinstance(layer[key], kind), (layer["name"], key)
        assert all(isinstance(u, int) for u in layer["dead_units"] + layer["rarely_active_units"])
        assert 0.0 <= layer["zero_fraction"] <= 1.0
    expected = next(m for m in manifest["models"] if m["name"] == "digits_mlp_dead")["dead_units"]
    assert [len(l["dead_units"]) for l in report["layers"]] == [v["dead"] for v in expected.values()]
    assert report["summary"]["dead_units"] == sum(v["dead"] for v in expected.values())
    assert report["gates"] == []


def test_json_to_stdout_is_only_the_payload(samples_dir: Path, calib_path: Path) -> None:
    result = invoke(*mlp_args(samples_dir, calib_path, "-f", "json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"][0]["name"] == "act1"


def test_table_to_file(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "table.txt"
    result = invoke(*mlp_args(samples_dir, calib_path, "-o", out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "act1" in text and "act2" in text and "\x1b[" not in text  # no colour codes in a file


def test_synthetic_data_warns_on_stderr(samples_dir: Path) -> None:
    result = invoke("analyze", samples_dir / "digits_mlp.pt", "--arch", arch_spec("digits_mlp"),
                    "--input-shape", "1,8,8", "-f", "json")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "synthetic" in result.stderr
    report = json.loads(result.stdout)  # the warning did not leak into the payload stream
    assert report["data"]["synthetic"] is True
    assert any("synthetic" in w for w in report["warnings"])


def test_no_warning_with_real_data(samples_dir: Path, calib_path: Path) -> None:
    result = invoke(*mlp_args(samples_dir, calib_path, "-f", "json"))
    assert "warning" not in result.stderr
    assert json.loads(result.stdout)["warnings"] == []


BATCH_CHECKING_ARCH = '''
import torch
from torch import nn

class BatchLimited(nn.Module):
    """Refuses batches larger than 7, so a run proves that --batch-size reached the forward pass."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.shape[0] > 7:
            raise ValueError(f"batch of {x.shape[0]} is larger than 7")
        return self.act(self.fc(x.flatten(1)))

def build():
    torch.manual_seed(0)
    return BatchLimited()
'''


def test_max_samples_and_batch_size_are_respected(calib_path: Path, tmp_path: Path) -> None:
    arch = tmp_path / "limited.py"
    arch.write_text(BATCH_CHECKING_ARCH)
    weights = tmp_path / "limited.pt"
    namespace: dict[str, Any] = {}
    exec(compile(BATCH_CHECKING_ARCH, str(arch), "exec"), namespace)  # noqa: S102 - our own test source
    torch.save(namespace["build"]().state_dict(), weights)
    base = ["analyze", weights, "--arch", f"{arch}:build", "--data", calib_path, "-f", "json"]

    result = invoke(*base, "--batch-size", "7", "--max-samples", "100")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["samples"] == 100
    assert report["run"]["batch_size"] == 7
    assert report["layers"][0]["samples"] == 100

    result = invoke(*base, "-b", "7", "-n", "5000")  # more than the 360 samples there are
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["samples"] == 360

    too_big = invoke(*base, "--batch-size", "8", "--max-samples", "100")
    assert_clean_failure(too_big)
    assert "larger than 7" in too_big.stderr


# ----------------------------------------------------------------------------- failures: exit 2, one line
def test_missing_model_file(calib_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = invoke("analyze", tmp_path / "nope.pt", "--data", calib_path, "-o", out)
    assert_clean_failure(result)
    assert "not found" in result.stderr
    assert not out.exists()


def test_corrupt_model_file(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((samples_dir / "digits_mlp.pt").read_bytes()[:500])
    out = tmp_path / "r.json"
    result = invoke("analyze", damaged, "--arch", arch_spec("digits_mlp"), "--data", calib_path, "-o", out)
    assert_clean_failure(result)
    assert not out.exists()


def test_corrupt_non_zip_model_file(calib_path: Path, tmp_path: Path) -> None:
    """Bytes that are neither a zip nor a pickle go to the ONNX loader, which must refuse them cleanly."""
    pytest.importorskip("reluscope.backends.onnx.graph", reason="the ONNX loader is not in this checkout yet")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a model\n" * 10)
    result = invoke("analyze", garbage, "--data", calib_path)
    assert_clean_failure(result)


def test_pickled_module_refused_then_trusted(calib_path: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU()), path)
    out = tmp_path / "r.json"
    refused = invoke("analyze", path, "--data", calib_path, "-o", out)
    assert_clean_failure(refused)
    assert "--trust-checkpoint" in refused.stderr
    assert not out.exists()
    trusted = invoke("analyze", path, "--data", calib_path, "--trust-checkpoint", "-f", "json")
    assert trusted.exit_code == 0, trusted.output
    assert json.loads(trusted.stdout)["model"]["format"] == "torch-pickle"


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_bad_device(device: str, samples_dir: Path, calib_path: Path) -> None:
    result = invoke(*mlp_args(samples_dir, calib_path, "--device", device))
    assert_clean_failure(result)
    assert "--device" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu(samples_dir: Path, calib_path: Path) -> None:
    result = invoke(*mlp_args(samples_dir, calib_path, "--device", "cuda"))
    assert_clean_failure(result)
    assert "CUDA" in result.stderr


def test_output_in_missing_folder(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "dir" / "r.json"
    result = invoke(*mlp_args(samples_dir, calib_path, "-f", "json", "-o", out))
    assert_clean_failure(result)
    assert not out.exists() and not out.parent.exists()


def test_output_is_a_folder(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    result = invoke(*mlp_args(samples_dir, calib_path, "-f", "json", "-o", tmp_path))
    assert_clean_failure(result)
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_regular_file(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = invoke(*mlp_args(samples_dir, calib_path, "-f", "json", "-o", blocker / "r.json"))
    assert_clean_failure(result)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_output_in_read_only_folder(samples_dir: Path, calib_path: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke(*mlp_args(samples_dir, calib_path, "-f", "json", "-o", locked / "r.json"))
        assert_clean_failure(result)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_state_dict_without_arch(samples_dir: Path, calib_path: Path) -> None:
    result = invoke("analyze", samples_dir / "digits_mlp.pt", "--data", calib_path)
    assert_clean_failure(result)
    assert "--arch" in result.stderr


def test_shape_mismatch_is_a_clean_error(samples_dir: Path) -> None:
    result = invoke("analyze", samples_dir / "digits_mlp.pt", "--arch", arch_spec("digits_mlp"),
                    "--input-shape", "3,32,32")
    assert_clean_failure(result)
    assert "--input-shape" in result.stderr or "--data" in result.stderr


def test_debug_shows_the_traceback(samples_dir: Path, calib_path: Path) -> None:
    result = invoke("analyze", samples_dir / "digits_mlp.pt", "--data", calib_path, "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.output


# ----------------------------------------------------------------------------- help and import cost
def test_help() -> None:
    result = invoke("--help")
    assert result.exit_code == 0 and "analyze" in result.stdout
    result = invoke("analyze", "--help")
    assert result.exit_code == 0
    for option in ("--data", "--arch", "--device", "--trust-checkpoint", "--max-samples"):
        assert option in result.stdout


def test_importing_the_cli_stays_light() -> None:
    code = ("import sys, reluscope, reluscope.cli; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_in_a_subprocess_does_not_import_torch(cli_env: dict) -> None:
    code = ("import sys\nfrom reluscope.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint('LOADED', sorted(m for m in ('torch', 'onnxruntime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, check=True)
    assert "LOADED []" in out.stdout and "analyze" in out.stdout


# ----------------------------------------------------------------------------- real processes
def test_python_dash_m(samples_dir: Path, calib_path: Path, tmp_path: Path, cli_env: dict) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "reluscope", *map(str, mlp_args(samples_dir, calib_path)),
                           "-f", "json", "-o", str(out), "-q"], capture_output=True, text=True, env=cli_env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert json.loads(out.read_text())["summary"]["layers"] == 2


def test_console_script(samples_dir: Path, calib_path: Path, cli_env: dict) -> None:
    script = VENV_BIN / "reluscope"
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    proc = subprocess.run([str(script), *map(str, mlp_args(samples_dir, calib_path)), "--format", "json"],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [layer["name"] for layer in report["layers"]] == ["act1", "act2"]


def test_version() -> None:
    from reluscope import __version__

    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"reluscope {__version__}"


def test_console_script_failure_is_one_line(tmp_path: Path, cli_env: dict) -> None:
    script = VENV_BIN / "reluscope"
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    proc = subprocess.run([str(script), "analyze", str(tmp_path / "missing.pt"), "--input-shape", "4"],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "not found" in proc.stderr


def test_json_report_validates_against_the_printed_schema(samples_dir: Path, calib_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema_result = invoke("schema")
    if schema_result.exit_code != 0:
        pytest.skip("this checkout has no `reluscope schema` command yet")
    schema = json.loads(schema_result.stdout)
    for model, factory in (("digits_cnn.pt", "digits_cnn"), ("digits_mlp_dead.pt", "digits_mlp")):
        result = invoke("analyze", samples_dir / model, "--arch", arch_spec(factory), "--data", calib_path, "-f", "json")
        assert result.exit_code == 0, result.output
        jsonschema.validate(json.loads(result.stdout), schema)
    broken = json.loads(result.stdout)
    del broken["layers"][0]["dead_units"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
