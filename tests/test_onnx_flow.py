"""ONNX graphs as deployed models are: inputs fed by name (with scalars), sites inside If branches and
loops, gates on incomplete reports, and the site names of the PyTorch report for an exported model."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope.cli import app

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


def branch(name: str, weights: dict[str, np.ndarray], hidden: str) -> onnx.GraphProto:
    """input @ w1 + state @ w2 -> Relu -> @ w3 -> Relu: two sites, reading the outer scope's tensors."""
    nodes = [helper.make_node("MatMul", ["input", f"{name}_w1"], [f"{name}_a"]),
             helper.make_node("MatMul", ["state", f"{name}_w2"], [f"{name}_b"]),
             helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_h"]),
             helper.make_node("Relu", [f"{name}_h"], [f"{name}_r1"], name=f"{name}_relu1"),
             helper.make_node("MatMul", [f"{name}_r1", f"{name}_w3"], [f"{name}_g"]),
             helper.make_node("Relu", [f"{name}_g"], [hidden], name=f"{name}_relu2")]
    inits = [numpy_helper.from_array(weights[key], f"{name}_{key}") for key in ("w1", "w2", "w3")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(hidden, TensorProto.FLOAT, None)], inits)


def vad_like(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Like silero VAD: inputs `input`, `state` and a scalar sample rate `sr`; every Relu sits in one of the
    two branches of an If on `sr == 16000`."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(8, 6)).astype(np.float32), "w2": rng.normal(size=(4, 6)).astype(np.float32),
               "w3": rng.normal(size=(6, 5)).astype(np.float32)}
    weights["w3"][:, 2] = -np.abs(weights["w3"][:, 2]) - 1  # unit 2 of the second Relu never fires
    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], name="by_rate", then_branch=branch("k16", weights, "t_out"),
                              else_branch=branch("k8", {k: -v for k, v in weights.items()}, "e_out"))]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 8]),
                                             helper.make_tensor_value_info("state", TensorProto.FLOAT, ["n", 4]),
                                             helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(np.array(16000, np.int64), "rate16k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path, weights


def reference(weights: dict[str, np.ndarray], x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r1 = np.maximum(x @ weights["w1"] + state @ weights["w2"], 0)
    return r1, np.maximum(r1 @ weights["w3"], 0)


@pytest.fixture()
def vad(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    path, weights = vad_like(tmp_path / "vad.onnx")
    rng = np.random.default_rng(1)
    x, state = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(20, 4)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, input=x, state=state, sr=np.array(16000, np.int64))  # `sr`: a 0-d array
    return path, data, weights, x, state


def test_inputs_named_input_and_state_with_a_scalar_are_all_fed(vad: tuple) -> None:
    path, data, weights, x, state = vad
    report = reluscope.analyze(path, data, batch_size=6)
    assert report.names == ["k16_relu1", "k16_relu2"]
    r1, r2 = reference(weights, x, state)
    for layer, y in zip(report.layers, (r1, r2)):
        assert layer["samples"] == 20 and layer["unit_axis"] == 0
        assert layer["zero_fraction"] == pytest.approx(1 - np.count_nonzero(y) / y.size)
        assert layer["dead_units"] == np.flatnonzero(~(y > 0).any(axis=0)).tolist()
        assert layer["max"] == pytest.approx(float(y.max()), rel=1e-5)
    assert report.layers[1]["dead_units"] == [2]
    # the branch no batch took is listed, marked as not reached, and leaves the report complete
    assert [(item["name"], item["reached"]) for item in report.unanalysed] == [("k8_relu1", False), ("k8_relu2", False)]
    assert not any("incomplete" in warning for warning in report.warnings)


def test_the_same_from_an_iterable_of_named_batches(vad: tuple) -> None:
    path, _, weights, x, state = vad
    batches = [{"input": x[i:i + 7], "state": state[i:i + 7], "sr": np.array(8000)} for i in range(0, 20, 7)]
    report = reluscope.analyze(path, batches)
    assert report.names == ["k8_relu1", "k8_relu2"]  # sr = 8000 takes the other branch
    r1, _ = reference({k: -v for k, v in weights.items()}, x, state)
    assert report.layers[0]["zero_fraction"] == pytest.approx(1 - np.count_nonzero(r1) / r1.size)


def test_vad_gate_passes_and_fails_on_what_was_measured(vad: tuple, tmp_path: Path) -> None:
    """Before, no site was measured and `dead_fraction>0.05` passed with exit 0."""
    path, data, *_ = vad
    out = tmp_path / "r.json"
    code, stderr = cli("analyze", str(path), "--data", str(data), "-f", "json", "-o", str(out),
                       "--fail-on", "dead_fraction>0.05")
    report = json.loads(out.read_text())
    assert report["summary"]["layers"] == 2 and report["summary"]["dead_units"] == 1
    assert code == 1 and "dead_fraction>0.05" in stderr  # 1 of 11 units is dead
    code, _ = cli("analyze", str(path), "--data", str(data), "--fail-on", "dead_fraction>0.2", "-q")
    assert code == 0


def test_a_data_file_missing_one_of_the_named_inputs_is_refused(vad: tuple, tmp_path: Path) -> None:
    path, _, _, x, state = vad
    data = tmp_path / "partial.npz"
    np.savez(data, input=x, state=state)
    code, stderr = cli("analyze", str(path), "--data", str(data))
    assert code == 2
    assert stderr.strip() == ("error: the model takes inputs ['input', 'state', 'sr']; the data names ['input', "
                              "'state'] but has no 'sr'; add an array for each input, under its name (a 0-d array "
                              "for a scalar input)")


def test_a_constant_condition_is_inlined(tmp_path: Path) -> None:
    """An If on a constant takes one branch, always: its sites become plain sites of the graph."""
    _, weights = vad_like(tmp_path / "unused.onnx")
    model = onnx.load(tmp_path / "unused.onnx")
    model.graph.node[0].CopyFrom(helper.make_node("Constant", [], ["is16k"], value=numpy_helper.from_array(
        np.array(True))))
    path = tmp_path / "constant.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(2)
    x, state = rng.normal(size=(9, 8)).astype(np.float32), rng.normal(size=(9, 4)).astype(np.float32)
    report = reluscope.analyze(path, {"input": x, "state": state, "sr": np.array(1)})
    assert report.names == ["k16_relu1", "k16_relu2"] and report.unanalysed == []
    r1, r2 = reference(weights, x, state)
    assert report.layers[1]["zero_fraction"] == pytest.approx(1 - np.count_nonzero(r2) / r2.size)


def loop_model(path: Path, with_outer_relu: bool) -> Path:
    """A Relu inside a Loop body (not measured), and optionally one outside it (measured)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Relu", ["carry_in"], ["r"], name="loop_relu"),
         helper.make_node("Sub", ["r", "one"], ["carry_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry_out", TensorProto.FLOAT, None)])
    first = "x"
    nodes = []
    if with_outer_relu:
        nodes.append(helper.make_node("Relu", ["x"], ["outer"], name="outer_relu"))
        first = "outer"
    nodes.append(helper.make_node("Loop", ["trips", "true", first], ["y"], name="loop", body=body))
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                               numpy_helper.from_array(np.array(True), "true"),
                               numpy_helper.from_array(np.array(1, np.float32), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_report_that_measured_nothing_fails_every_gate(tmp_path: Path) -> None:
    path = loop_model(tmp_path / "loop.onnx", with_outer_relu=False)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32))
    out = tmp_path / "r.json"
    code, stderr = cli("analyze", str(path), "--data", str(data), "--fail-on", "dead_fraction>0.05", "-q", "-f", "json",
                       "-o", str(out))
    assert code == 1
    assert "gate failed: measured sites == 0: FAILED (value 0); offending sites: loop_relu" in stderr
    report = json.loads(out.read_text())
    assert report["layers"] == [] and [u["name"] for u in report["unanalysed"]] == ["loop_relu"]
    gate = report["gates"][-1]
    assert gate["rule"] == "measured sites == 0" and not gate["passed"] and "no activation site" in gate["reason"]
    assert any("incomplete" in warning for warning in report["warnings"])
    assert cli("analyze", str(path), "--data", str(data))[0] == 0  # no gate asked for: the report is the answer


def test_unanalysed_sites_fail_the_rules_that_would_read_them(tmp_path: Path) -> None:
    path = loop_model(tmp_path / "loop.onnx", with_outer_relu=True)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32))
    code, stderr = cli("analyze", str(path), "--data", str(data), "--fail-on", "dead_fraction>0.9", "-q", "-f",
                       "json", "-o", str(tmp_path / "r.json"))
    assert code == 1 and "unanalysed sites > 0: FAILED (value 1); offending sites: loop_relu" in stderr
    assert cli("analyze", str(path), "--data", str(data), "--fail-on", "*:max>100")[0] == 1
    # a rule scoped to measured sites only still decides alone
    assert cli("analyze", str(path), "--data", str(data), "--fail-on", "outer_relu:dead_fraction>0.9")[0] == 0


# ------------------------------------------------------------------------------- names across formats
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.Hardswish())
        self.block = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 16)
        self.gelu = nn.GELU(approximate="tanh")
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.features[2].bias[3] = -50.0
            self.fc.bias[5] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.features(x))          # `act` called twice: act#0, act#1
        x = self.act(self.block(x) - 0.1)
        x = F.silu(x).mean(dim=(2, 3))           # functional at the top: silu()
        return self.head(self.gelu(F.relu(self.fc(x))))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_the_exported_model_gets_the_torch_reports_site_names(dynamo: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(24, 3, 8, 8)
    path = tmp_path / "net.onnx"
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x[:2],), str(path), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        else:  # opset 13: HardSwish and the tanh GELU are written out as HardSigmoid*x and their formula
            torch.onnx.export(model, (x[:2],), str(path), dynamo=False, opset_version=13, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    data = tmp_path / "x.npy"
    np.save(data, x.numpy())
    torch_report = reluscope.analyze(model, x, batch_size=8)
    (tmp_path / "torch.json").write_text(torch_report.to_json())
    out = tmp_path / "onnx.json"
    assert cli("analyze", str(path), "--data", str(data), "--batch-size", "8", "-f", "json", "-o", str(out))[0] == 0
    onnx_report = json.loads(out.read_text())
    assert torch_report.names == ["features.1", "features.3", "act#0", "act#1", "silu()", "relu()", "gelu"]
    assert [layer["name"] for layer in onnx_report["layers"]] == torch_report.names
    assert all(layer["node"] and layer["tensor"] for layer in onnx_report["layers"])
    for ours, theirs in zip(onnx_report["layers"], torch_report.layers):
        assert ours["op"] == theirs["op"] and ours["dead_units"] == theirs["dead_units"], ours["name"]
    diff = tmp_path / "diff.json"
    code, _ = cli("diff", str(tmp_path / "torch.json"), str(out), "-f", "json", "-o", str(diff))
    document = json.loads(diff.read_text())
    assert document["added"] == [] and document["removed"] == []
    assert code == 0
    # scoped rules read the same sites in both reports
    assert cli("analyze", str(path), "--data", str(data), "--fail-on", "features.*:dead_units>0", "-q")[0] == 1
