"""An ONNX analysis never imports torch: onnxruntime reduces inside the graph, and what comes back
(numpy arrays) is merged on the host by the same declared accumulators as the torch route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CALIB, SAMPLES

PROBE = """
import json, sys
from reluscope.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "loaded": sorted(m for m in ("torch", "triton", "transformers") if m in sys.modules)}),
      file=sys.stderr)
"""


def _probe(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("extra", [["--data", str(CALIB)], ["--data", str(CALIB), "--percentiles"],
                                   ["--data", str(CALIB), "--fail-on", "dead_fraction>0.9"],
                                   ["--input-shape", "1,8,8"]],  # synthetic inputs
                         ids=["data", "percentiles", "gate", "synthetic"])
def test_an_onnx_analysis_does_not_import_torch(extra: list[str], tmp_path: Path, cli_env: dict) -> None:
    out = tmp_path / "report.json"
    result = _probe(["analyze", str(SAMPLES / "digits_mlp_dead.onnx"), "-q", "-f", "json", "-o", str(out), *extra],
                    cli_env)
    assert result == {"exit": 0, "loaded": []}
    report = json.loads(out.read_text())
    assert report["run"]["backend"] == "onnxruntime" and report["summary"]["units"] == 192


def test_the_host_route_reports_what_the_torch_route_reports(tmp_path: Path, cli_env: dict) -> None:
    """The same trained model as a state_dict (torch route) and as ONNX (numpy on the host): the
    same sites, dead units and counts; sums to float rounding."""
    torch_json, onnx_json = tmp_path / "torch.json", tmp_path / "onnx.json"
    for args, out in ((["digits_mlp_dead.pt", "--arch", f"{SAMPLES / 'architectures.py'}:digits_mlp"], torch_json),
                      (["digits_mlp_dead.onnx"], onnx_json)):
        proc = subprocess.run([sys.executable, "-m", "reluscope", "analyze", str(SAMPLES / args[0]), *args[1:],
                               "--data", str(CALIB), "--percentiles", "-q", "-f", "json", "-o", str(out)],
                              capture_output=True, text=True, env=cli_env, timeout=120)
        assert proc.returncode == 0, proc.stderr
    torch_layers = json.loads(torch_json.read_text())["layers"]
    onnx_layers = json.loads(onnx_json.read_text())["layers"]
    assert [l["name"] for l in onnx_layers] == [l["name"] for l in torch_layers]
    for got, want in zip(onnx_layers, torch_layers):
        for key in ("units", "samples", "dead_units", "rarely_active_units", "nonfinite"):
            assert got[key] == want[key], (want["name"], key)
        for key in ("zero_fraction", "min", "max", "mean", "std"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["name"], key)
        for name, value in want["percentiles"].items():
            assert got["percentiles"][name] == pytest.approx(value, rel=1e-2), (want["name"], name)
