"""Scale-out and percentiles: torchrun with two gloo processes reports exactly what one
process reports; streaming percentiles stay within their documented relative error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import reluscope
from reluscope.measure import histogram
from conftest import CALIB, SAMPLES


def _run_json(args: list[str], out: Path, env: dict) -> dict:
    result = subprocess.run([*args, "-f", "json", "-o", str(out), "--quiet"], capture_output=True, text=True,
                            env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["digits_cnn.pt2", "digits_mlp_dead.torchscript"])
def test_torchrun_two_gloo_processes_match_one_process(model: str, tmp_path: Path, cli_env: dict) -> None:
    analyze = ["-m", "reluscope", "analyze", str(SAMPLES / model), "--data", str(CALIB), "--batch-size", "32",
               "--gradients", "--percentiles", *(["--trust-checkpoint"] if model.endswith(".torchscript") else [])]
    single = _run_json([sys.executable, *analyze], tmp_path / "single.json", cli_env)
    sharded = _run_json([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         *analyze], tmp_path / "sharded.json", cli_env)
    assert sharded["run"]["processes"] == 2 and single["run"]["processes"] == 1
    assert sharded["data"]["samples"] == single["data"]["samples"] == 360
    assert [l["name"] for l in sharded["layers"]] == [l["name"] for l in single["layers"]]
    for one, two in zip(single["layers"], sharded["layers"]):
        for key in ("zero_fraction", "dead_units", "rarely_active_units", "dormant_units", "min", "max", "nonfinite",
                    "units", "shape", "percentiles"):
            assert one[key] == two[key], (one["name"], key)
        for key in ("mean", "std"):  # float64 sums in another order
            assert one[key] == pytest.approx(two[key], rel=1e-9, abs=1e-12)
        assert one["gradient"]["zero_fraction"] == two["gradient"]["zero_fraction"]
        assert one["gradient"]["rms"] == pytest.approx(two["gradient"]["rms"], rel=1e-6)
    assert single["summary"] == sharded["summary"]
    flow_one, flow_two = single["gradient_flow"], sharded["gradient_flow"]
    assert flow_one["verdict"] == flow_two["verdict"] and flow_one["batches"] == flow_two["batches"] == 12
    for a, b in zip(flow_one["parameters"], flow_two["parameters"]):
        assert a["name"] == b["name"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def _exact_percentile(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[max(1, int(np.ceil(q * len(ordered)))) - 1])


def test_percentiles_within_the_documented_bound() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU()).eval()
    x = torch.randn(500, 16)
    report = reluscope.analyze(model, x, batch_size=64, percentiles=True)
    with torch.no_grad():
        relu_out = torch.relu(model[0](x)).numpy().ravel()
        gelu_out = model[3](model[2](torch.from_numpy(relu_out.reshape(500, 32)))).numpy().ravel()
    for layer, values in zip(report.layers, (relu_out, gelu_out)):
        for name, q in histogram.PERCENTILES:
            exact = _exact_percentile(values, q)
            got = layer["percentiles"][name]
            assert abs(got - exact) <= histogram.RELATIVE_ERROR * abs(exact) + 1e-30, (layer["name"], name, got, exact)
    assert report.layers[1]["percentiles"]["p1"] < 0  # GELU outputs dip below zero: the signed histogram


def test_percentiles_do_not_depend_on_batching() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.1)).eval()
    x = torch.randn(300, 8)
    whole = reluscope.analyze(model, x, batch_size=300, percentiles=True).layers[0]["percentiles"]
    split = reluscope.analyze(model, x, batch_size=7, percentiles=True).layers[0]["percentiles"]
    assert whole == split


def test_percentiles_are_off_by_default() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert "percentiles" not in reluscope.analyze(model, torch.randn(10, 4)).layers[0]
