"""ONNX through onnxruntime: the same report as the PyTorch path, on real exported files.

Parity models use dyadic weights and inputs (small multiples of powers of two), so every
convolution and matrix product before a site is exact in float32 whatever the summation
order: torch and onnxruntime then agree on the sign of every pre-activation, and sparsity
and dead units can be compared exactly rather than up to rounding.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import reluscope
from reluscope.errors import InputError, UsageError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DEAD = -1.0e4  # a bias that keeps a unit's input negative on any data used here


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    return path


def dyadic_(module: nn.Module, generator: torch.Generator) -> None:
    """Weights and biases in multiples of 1/16 within [-0.5, 0.5]: products and sums stay exact."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randint(-8, 9, param.shape, generator=generator) / 16)


def dyadic_inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=generator) / 2


class Zoo(nn.Module):
    """One exact trunk (conv + BatchNorm + ReLU), then one conv + activation branch per op, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branches = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(12))
        self.prelu = nn.PReLU(8, init=0.25)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)
        generator = torch.Generator().manual_seed(0)
        dyadic_(self, generator)
        with torch.no_grad():
            self.prelu.weight.fill_(0.25)
            self.bn.weight.fill_(1.0)
            self.bn.running_mean.copy_(torch.randint(-4, 5, (8,), generator=generator) / 16)
            self.bn.running_var.fill_(4.0 - self.bn.eps)  # 1 / sqrt(var + eps) == 0.5 exactly
            self.bn.bias[[1, 5]] = DEAD
            for index, branch in enumerate(self.branches):
                branch.bias[index % 8] = DEAD
            self.fc.bias[[3, 7]] = DEAD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        b = self.branches
        outs = [
            F.relu6(b[0](h)), F.leaky_relu(b[1](h), 0.125), F.gelu(b[2](h)), F.silu(b[3](h)), self.prelu(b[4](h)),
            F.elu(b[5](h)), F.hardswish(b[6](h)), F.mish(b[7](h)), F.selu(b[8](h)), F.celu(b[9](h)),
            F.hardtanh(b[10](h), 0.0, 3.0), torch.clamp(b[11](h), min=0),
        ]
        pooled = outs[0].mean(dim=(2, 3))  # a mean over 8x8 positions: still exact
        z = F.relu(self.fc(pooled))
        return self.head(z) + sum(o.mean() for o in outs[1:])


class Sequence(nn.Module):
    """Linear layers on (batch, time, features): MatMul sites with units on the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        dyadic_(self, torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.a.bias[[0, 9]] = DEAD
            self.b.bias[4] = DEAD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.a(x)) + F.gelu(self.b(x))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, torch.Tensor]:
    model = Zoo().eval()
    x = dyadic_inputs((40, 3, 8, 8))
    path = export(model, x[:4], tmp_path_factory.mktemp("zoo") / "zoo.onnx")
    return model, path, x


def assert_parity(torch_report: Any, onnx_report: Any) -> None:
    assert len(onnx_report.layers) == len(torch_report.layers)
    for ours, ref in zip(onnx_report.layers, torch_report.layers):
        where = f"{ours['name']} vs {ref['name']}"
        assert ours["op"] == ref["op"], where
        assert ours["shape"] == ref["shape"] and ours["unit_axis"] == ref["unit_axis"], where
        assert ours["samples"] == ref["samples"], where
        assert abs(ours["zero_fraction"] - ref["zero_fraction"]) <= 1e-6, where
        assert ours["dead_units"] == ref["dead_units"], where
        assert math.isclose(ours["min"], ref["min"], rel_tol=1e-5, abs_tol=1e-5), where
        assert math.isclose(ours["max"], ref["max"], rel_tol=1e-5, abs_tol=1e-5), where
        assert math.isclose(ours["mean"], ref["mean"], rel_tol=1e-4, abs_tol=1e-5), where


def test_parity_with_the_torch_path(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    model, path, x = zoo
    theirs = reluscope.analyze(model, x, batch_size=8)
    ours = reluscope.analyze(path, x, batch_size=8)
    assert ours.run["backend"] == "onnxruntime" and ours.model["format"] == "onnx"
    assert [layer["op"] for layer in ours.layers] == [
        "relu", "relu6", "leaky_relu", "gelu", "silu", "prelu", "elu", "hardswish", "mish", "selu", "celu", "clamp",
        "clamp", "relu"]
    assert_parity(theirs, ours)
    assert all(layer["dead_units"] for layer in ours.layers)  # the planted ones, at least
    assert ours.layers[0]["dead_units"] == [1, 5] and {3, 7} <= set(ours.layers[-1]["dead_units"])
    assert all(layer["tensor"] for layer in ours.layers)


def test_decomposed_activations_of_the_torchscript_exporter(zoo: tuple[nn.Module, Path, torch.Tensor],
                                                            tmp_path: Path) -> None:
    """Opset 13 has no Gelu, HardSwish or Mish op: the exporter writes Erf, HardSigmoid and Softplus/Tanh
    patterns ending in a Mul, which must be one site each (and their gates none)."""
    model, _, x = zoo
    path = tmp_path / "zoo13.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:4],), str(path), dynamo=False, opset_version=13, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"Erf", "HardSigmoid", "Softplus"} <= ops and not {"Gelu", "HardSwish", "Mish"} & ops
    ours = reluscope.analyze(path, x, batch_size=8)
    theirs = reluscope.analyze(model, x, batch_size=8)
    assert_parity(theirs, ours)
    assert ours.names == theirs.names  # from the exporter's scoped node names
    assert ours.layers[0]["node"] == "/Relu"


def test_unit_axis_override_matches_the_torch_path(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    model, path, x = zoo
    assert_parity(reluscope.analyze(model, x, batch_size=8, unit_axis=-1),
                  reluscope.analyze(path, x, batch_size=8, unit_axis=-1))


def test_in_graph_reductions_equal_the_exact_route(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    """One batch takes the exact route only; many batches fold in-graph reductions after the first."""
    _, path, x = zoo
    exact = reluscope.analyze(path, x, batch_size=len(x))
    folded = reluscope.analyze(path, x, batch_size=4)
    for a, b in zip(exact.layers, folded.layers):
        for key in ("zero_fraction", "dead_units", "rarely_active_units", "min", "max", "samples",
                    "saturated_fraction", "nonfinite"):
            assert a[key] == b[key], (a["name"], key)
        assert math.isclose(a["mean"], b["mean"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(a["std"], b["std"], rel_tol=1e-4, abs_tol=1e-6)
        assert a["dormant_units"] == b["dormant_units"]


def test_nan_batches_take_the_exact_route(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    _, path, x = zoo
    x = x.clone()
    x[13, 0, 2, 2] = float("nan")
    exact = reluscope.analyze(path, x, batch_size=len(x))
    folded = reluscope.analyze(path, x, batch_size=4)
    assert exact.summary["nonfinite"] > 0
    for a, b in zip(exact.layers, folded.layers):
        assert (a["nonfinite"], a["zero_fraction"], a["min"], a["max"]) == (
            b["nonfinite"], b["zero_fraction"], b["min"], b["max"]), a["name"]


def test_percentiles_read_every_value(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    """The streaming histogram needs every value, so no site takes the in-graph reductions."""
    model, path, x = zoo
    ours = reluscope.analyze(path, x, batch_size=8, percentiles=True)
    theirs = reluscope.analyze(model, x, batch_size=8, percentiles=True)
    assert_parity(theirs, ours)
    for a, b in zip(ours.layers, theirs.layers):
        assert a["percentiles"].keys() == b["percentiles"].keys()
        for key in a["percentiles"]:
            assert a["percentiles"][key] == pytest.approx(b["percentiles"][key], rel=0.01, abs=1e-6), a["name"]


def test_local_functions_are_inlined(tmp_path: Path) -> None:
    body = helper.make_function("local", "Block", ["a"], ["b"], [
        helper.make_node("MatMul", ["a", "w"], ["h"]), helper.make_node("Relu", ["h"], ["b"], name="inner_relu")],
        opset_imports=[helper.make_opsetid("", 17)])
    body.node.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(
        np.eye(4, dtype=np.float32) - 0.5)))
    graph = helper.make_graph([helper.make_node("Block", ["x"], ["y"], domain="local", name="block")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, functions=[body], opset_imports=[helper.make_opsetid("", 17),
                                                                        helper.make_opsetid("local", 1)])
    path = tmp_path / "functions.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(5).normal(size=(12, 4)).astype(np.float32)
    report = reluscope.analyze(path, x)
    assert [(layer["op"], layer["unit_axis"]) for layer in report.layers] == [("relu", 0)]
    expected = np.maximum(x @ (np.eye(4, dtype=np.float32) - 0.5), 0)
    assert report.layers[0]["zero_fraction"] == pytest.approx(1 - np.count_nonzero(expected) / expected.size)


def test_onnx_only_forms_and_non_sites(tmp_path: Path) -> None:
    """ThresholdedRelu, HardSigmoid, Clip without max and Max(x, 0) are sites; Clip(min=-1) is not."""
    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))

    nodes = [const("zero", 0.0), const("minus_one", -1.0), const("two", 2.0),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("ThresholdedRelu", ["c"], ["t"], alpha=0.5, name="thresholded"),
             helper.make_node("HardSigmoid", ["c"], ["h"], name="hardsigmoid"),
             helper.make_node("Clip", ["c", "zero", ""], ["m"], name="clip_min_only"),
             helper.make_node("Clip", ["c", "minus_one", "two"], ["n"], name="clip_not_a_site"),
             helper.make_node("Max", ["zero", "c"], ["k"], name="max_zero"),
             helper.make_node("Clip", ["c", "zero", "two"], ["q"], name="clip_0_2"),
             helper.make_node("Sum", ["t", "h", "m", "n", "k", "q"], ["y"])]
    w = numpy_helper.from_array(np.random.default_rng(6).normal(size=(4, 2, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 3, 3])], [w])
    path = tmp_path / "forms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    report = reluscope.analyze(path, np.random.default_rng(7).normal(size=(9, 2, 3, 3)).astype(np.float32),
                               batch_size=4)
    assert [(layer["name"], layer["op"], layer["unit_axis"]) for layer in report.layers] == [
        ("thresholded", "thresholded_relu", 0), ("hardsigmoid", "hardsigmoid", 0), ("clip_min_only", "clamp", 0),
        ("max_zero", "clamp", 0), ("clip_0_2", "clamp", 0)]
    by_name = {layer["name"]: layer for layer in report.layers}
    assert by_name["clip_min_only"]["saturated_fraction"] is None
    assert by_name["clip_0_2"]["saturated_fraction"] > 0 and by_name["clip_0_2"]["max"] == 2.0
    assert by_name["hardsigmoid"]["max"] <= 1.0
    assert by_name["max_zero"]["zero_fraction"] == by_name["clip_min_only"]["zero_fraction"]


def test_models_past_protobufs_limit_keep_their_weights_on_disk(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 2 GB the graph is serialized without weights and onnxruntime reads them from the model's folder;
    the limit is lowered here so that a small model takes that route."""
    import reluscope.backends.onnx.session as capture

    model = old_style_model()
    path = tmp_path / "external.onnx"
    onnx.save(model, path, save_as_external_data=True, location="external.onnx.data", size_threshold=0)
    x = np.random.default_rng(8).uniform(0.5, 1.5, size=(8, 3, 6, 6)).astype(np.float32)
    expected = reluscope.analyze(path, x)
    monkeypatch.setattr(capture, "PROTOBUF_LIMIT", 1000)
    assert reluscope.analyze(path, x).layers == expected.layers


def test_memory_does_not_grow_with_the_number_of_batches(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    """Each batch is reduced and dropped (onnxruntime's calibrator keeps every batch's outputs)."""
    import tracemalloc

    from reluscope.backends.onnx.session import OnnxCapture
    from reluscope.measure.recorder import SiteRecorder

    _, path, x = zoo

    def epochs(capture: OnnxCapture, count: int) -> int:
        for _ in range(count):
            for start in range(0, 40, 8):
                capture.run((x[start:start + 8],))
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        with OnnxCapture(onnx.load(path), SiteRecorder(), path=str(path)) as capture:
            epochs(capture, 5)  # the last batch's small arrays stay referenced until the next one
            settled = epochs(capture, 10)  # one-time allocations (lazy imports, caches) happen by now
            growth = epochs(capture, 20) - settled
    finally:
        tracemalloc.stop()
    # Keeping the site tensors would grow by ~20 MB here, keeping even the reductions by ~1 MB; numpy's
    # small-buffer cache alone moves the count by some 10 kB
    assert growth < 256 * 1024


def test_matmul_sites_have_units_on_the_last_axis(tmp_path: Path) -> None:
    model = Sequence().eval()
    x = dyadic_inputs((24, 10, 8), seed=2)
    path = export(model, x[:4], tmp_path / "seq.onnx")
    theirs = reluscope.analyze(model, x, batch_size=5)
    ours = reluscope.analyze(path, x, batch_size=5)
    assert [(layer["op"], layer["unit_axis"]) for layer in ours.layers] == [("relu", 1), ("gelu", 1)]
    assert_parity(theirs, ours)
    assert ours.layers[0]["dead_units"] == [0, 9]


def test_ranges_equal_onnxruntime_minmax_calibrator(zoo: tuple[nn.Module, Path, torch.Tensor],
                                                    tmp_path: Path) -> None:
    """The field's reference for activation ranges: MinMaxCalibrater with its defaults
    (symmetric=False, moving_average=False: the global min and max over all batches)."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    _, path, x = zoo
    batches = [{"x": x[i:i + 8].numpy()} for i in range(0, len(x), 8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    calibrator = create_calibrator(path, ["Relu"], augmented_model_path=str(tmp_path / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(Reader())
    ranges = calibrator.compute_data()
    report = reluscope.analyze(path, x, batch_size=8)
    relus = [node.output[0] for node in onnx.load(path).graph.node if node.op_type == "Relu"]
    assert relus
    by_tensor = {layer["tensor"]: layer for layer in report.layers}
    for tensor in relus:
        low, high = (float(np.ravel(v)[0]) for v in ranges[tensor].range_value)
        assert by_tensor[tensor]["min"] == pytest.approx(low, rel=1e-6, abs=1e-7), tensor
        assert by_tensor[tensor]["max"] == pytest.approx(high, rel=1e-6, abs=1e-7), tensor


def old_style_model() -> onnx.ModelProto:
    """As exporters wrote them around 2018: IR 3, opset 8, unnamed nodes, numeric tensor names,
    every initializer repeated among the graph inputs, and a fixed batch size of 4."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.normal(size=6).astype(np.float32) * 0.1
    w[2] = -1.0  # real inputs are positive: channel 2 never fires on them, but fires (bias 1) on zero padding
    b[2] = 1.0
    fc_w = rng.normal(size=(6 * 4 * 4, 5)).astype(np.float32) * 0.2
    fc_b = np.array([0.1, -0.2, 1.0, 0.0, -50.0], np.float32)
    inits = {"10": w, "11": b, "12": fc_w, "13": fc_b}
    nodes = [
        helper.make_node("Conv", ["0", "10", "11"], ["1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["1"], ["2"]),
        helper.make_node("Flatten", ["2"], ["3"], axis=1),
        helper.make_node("Gemm", ["3", "12", "13"], ["4"]),
        helper.make_node("LeakyRelu", ["4"], ["5"], alpha=0.1),
        helper.make_node("Clip", ["5"], ["6"], min=0.0, max=6.0),
    ]
    inputs = [helper.make_tensor_value_info("0", TensorProto.FLOAT, [4, 3, 6, 6])] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)) for name, value in inits.items()]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("6", TensorProto.FLOAT, [4, 5])],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="old-exporter")
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_old_style_model_with_fixed_batch_and_padding(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = old_style_model()
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(4).uniform(0.5, 1.5, size=(10, 3, 6, 6)).astype(np.float32)
    report = reluscope.analyze(path, x, batch_size=10)  # chunks of 4, 4 and 2 real rows + 2 padding rows

    # Reference: the site tensors of the 10 real rows, read straight from onnxruntime
    for name in ("2", "5", "6"):
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    padded = np.concatenate([x, np.zeros((2, 3, 6, 6), np.float32)])
    outs = [session.run(["2", "5", "6"], {"0": padded[i:i + 4]}) for i in range(0, 12, 4)]
    tensors = {name: np.concatenate([o[k] for o in outs])[:10] for k, name in enumerate(("2", "5", "6"))}

    assert [(layer["name"], layer["op"], layer["unit_axis"]) for layer in report.layers] == [
        ("2", "relu", 0), ("5", "leaky_relu", 0), ("6", "relu6", 0)]
    for layer in report.layers:
        y = tensors[layer["name"]]
        axes = (0, 2, 3) if y.ndim == 4 else (0,)
        assert layer["samples"] == 10
        assert layer["zero_fraction"] == pytest.approx(1 - np.count_nonzero(y > 0) / y.size, abs=1e-12)
        assert layer["dead_units"] == np.flatnonzero(~(y > 0).any(axis=axes)).tolist()
        assert layer["min"] == pytest.approx(float(y.min()), abs=1e-6)
        assert layer["max"] == pytest.approx(float(y.max()), abs=1e-6)
        assert layer["mean"] == pytest.approx(float(y.astype(np.float64).mean()), rel=1e-5, abs=1e-6)
    assert 2 in report.layers[0]["dead_units"]  # padding rows would have made channel 2 fire
    assert 4 in report.layers[1]["dead_units"]


def test_relu_inside_if_is_measured_when_its_branch_runs(tmp_path: Path) -> None:
    """The condition depends on the data: the then-branch's Relu is measured on the batches that take it."""
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["r"], [f"{name}_out"], name=f"{name}_{op.lower()}")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None, 4])])

    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="outer_relu"),
        helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=branch("then", "Relu"),
                         else_branch=branch("else", "Neg")),
    ]
    graph = helper.make_graph(nodes, "with_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "if.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[:3] = -np.abs(x[:3])  # the first batch takes the else branch, the second the then branch
    report = reluscope.analyze(path, x, batch_size=3)
    assert report.names == ["outer_relu", "then_relu"] and not report.unanalysed
    then = report.layer("then_relu")
    r = np.maximum(x[3:], 0)
    assert then["samples"] == 3 and then["zero_fraction"] == pytest.approx(1 - np.count_nonzero(r) / r.size)
    assert then["max"] == pytest.approx(float(r.max()))
    never = reluscope.analyze(path, x[:3])  # only the else branch runs: listed, not dropped
    assert never.names == ["outer_relu"]
    assert [(item["name"], item["op"]) for item in never.unanalysed] == [("then_relu", "relu")]
    assert "then_branch of If node 'gate'" in never.unanalysed[0]["reason"] and "never ran" in never.unanalysed[0]["reason"]
    assert never.unanalysed[0]["reached"] is False  # nothing ran there: the report is complete for this data
    assert not any("incomplete" in warning for warning in never.warnings)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="sample_models/ is not in this checkout")
@pytest.mark.parametrize("name, arch", [("digits_mlp", "digits_mlp"), ("digits_cnn", "digits_cnn"),
                                        ("digits_mlp_dead", "digits_mlp")])
def test_sample_models_match_their_checkpoints(name: str, arch: str) -> None:
    calib = SAMPLES / "digits_calib.npz"
    ours = reluscope.analyze(SAMPLES / f"{name}.onnx", calib, batch_size=64)
    theirs = reluscope.analyze(SAMPLES / f"{name}.pt", calib, batch_size=64,
                               arch=f"{SAMPLES / 'architectures.py'}:{arch}")
    assert_parity(theirs, ours)
    assert ours.summary["dead_units"] == theirs.summary["dead_units"] > 0


# ---------------------------------------------------------------------------------------------- errors
def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "random.onnx"
    path.write_bytes(b"\x13\x37" + np.random.default_rng(0).bytes(4096))  # no zip or pickle marker
    with pytest.raises(InputError, match="not an ONNX model"):
        reluscope.analyze(path, np.zeros((2, 1, 8, 8), np.float32))


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="sample_models/ is not in this checkout")
def test_truncated_file_is_refused(tmp_path: Path) -> None:
    data = (SAMPLES / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        reluscope.analyze(path, np.zeros((2, 1, 8, 8), np.float32))
    assert "\n" not in str(info.value)


def test_missing_external_weights_are_refused(tmp_path: Path) -> None:
    model = old_style_model()
    path = tmp_path / "external.onnx"
    onnx.save(model, path, save_as_external_data=True, location="external.onnx.data", size_threshold=0)
    (tmp_path / "external.onnx.data").unlink()
    with pytest.raises(InputError, match="external weights"):
        reluscope.analyze(path, np.ones((4, 3, 6, 6), np.float32))


def test_external_weights_are_loaded_from_the_models_folder(tmp_path: Path) -> None:
    model = old_style_model()
    inline, external = tmp_path / "inline.onnx", tmp_path / "sub" / "external.onnx"
    external.parent.mkdir()
    onnx.save(model, inline)
    onnx.save(model, external, save_as_external_data=True, location="weights.bin", size_threshold=0)
    x = np.ones((4, 3, 6, 6), np.float32)
    assert reluscope.analyze(external, x).layers == reluscope.analyze(inline, x).layers


def test_wrong_input_shape_names_both_shapes(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    _, path, _ = zoo
    with pytest.raises(InputError, match=r"expects shape \(batch, 3, 8, 8\).*\(5, 3, 9, 9\)"):
        reluscope.analyze(path, torch.zeros(5, 3, 9, 9))


def test_wrong_input_names_list_the_graphs_inputs(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    _, path, x = zoo
    with pytest.raises(InputError, match=r"\['x'\]"):
        reluscope.analyze(path, [{"image": x[:4].numpy(), "mask": x[:4].numpy()}])


def test_inputs_are_cast_to_the_graphs_dtype_with_a_warning(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    _, path, x = zoo
    report = reluscope.analyze(path, [x[:8].to(torch.float16)])
    assert any("cast" in warning for warning in report.warnings)
    assert report.data["samples"] == 8


def test_cuda_without_onnxruntime_gpu_is_a_usage_error(zoo: tuple[nn.Module, Path, torch.Tensor]) -> None:
    import onnxruntime as ort

    from reluscope.backends.onnx.session import OnnxCapture
    from reluscope.measure.recorder import SiteRecorder

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    _, path, _ = zoo
    with pytest.raises(UsageError, match="onnxruntime-gpu"):
        OnnxCapture(onnx.load(path), SiteRecorder(), device="cuda")


def test_sites_carry_the_pytorch_name_from_the_exporter_metadata(samples_dir: Path, calib_path: Path) -> None:
    """node_relu_2 is traced back to the module the torch path names: the same name in both reports."""
    torch_report = reluscope.analyze(samples_dir / "digits_cnn.pt2", calib_path)
    onnx_report = reluscope.analyze(samples_dir / "digits_cnn.onnx", calib_path)
    assert [layer["module"] for layer in onnx_report.layers] == torch_report.names == ["relu#0", "relu()", "relu#1"]
    assert onnx_report.names == torch_report.names
    assert [layer["node"] for layer in onnx_report.layers] == [node.name for node in onnx.load(
        samples_dir / "digits_cnn.onnx").graph.node if node.op_type == "Relu"]  # the node names stay, as fields


# ----------------------------------------------------------------------------- onnxruntime-optimized files
def ort_optimized(source: Path, target: Path, level: str) -> Path:
    """`source` as onnxruntime saves it after graph optimization (`optimized_model_filepath`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # ENABLE_ALL warns that the file is machine-specific: that is the point
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target


class FusableActivations(nn.Module):
    """Conv + ReLU6, Conv + LeakyReLU and Linear + ReLU: each pair becomes one fused onnxruntime node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(5 * 8 * 8, 12)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.leaky(self.conv2(self.relu6(3 * self.conv1(x))))
        return self.relu(self.fc(x.flatten(1)))


def test_fused_conv_and_gemm_of_an_optimized_model_are_sites(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 1, 8, 8)
    plain = export(FusableActivations(), x[:2], tmp_path / "plain.onnx")
    fused = ort_optimized(plain, tmp_path / "fused.onnx", "ORT_ENABLE_EXTENDED")
    fused_ops = [(n.domain, n.op_type) for n in onnx.load(fused).graph.node]
    assert ("com.microsoft", "FusedConv") in fused_ops and ("com.microsoft", "FusedGemm") in fused_ops
    assert not [op for domain, op in fused_ops if op in ("Relu", "LeakyRelu", "Clip")]  # all folded in

    want = reluscope.analyze(plain, x, batch_size=16)
    got = reluscope.analyze(fused, x, batch_size=16)
    assert [layer["op"] for layer in got.layers] == ["relu6", "leaky_relu", "relu"]
    assert not got.unanalysed
    for a, b in zip(got.layers, want.layers):
        for key in ("op", "shape", "unit_axis", "units", "samples", "dead_units", "rarely_active_units",
                    "dormant_units", "zero_fraction", "saturated_fraction", "nonfinite"):
            assert a[key] == b[key], (b["name"], key)
        for key in ("min", "max", "mean", "std"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (b["name"], key)
    assert got.layers[0]["saturated_fraction"] > 0  # 3 * conv1 reaches ReLU6's bound


def test_blocked_layout_convolutions_are_listed_as_unanalysed(samples_dir: Path, calib_path: Path,
                                                              tmp_path: Path) -> None:
    blocked = ort_optimized(samples_dir / "digits_cnn.onnx", tmp_path / "all.onnx", "ORT_ENABLE_ALL")
    nchwc = [n.name for n in onnx.load(blocked).graph.node if n.domain == "com.microsoft.nchwc" and n.op_type == "Conv"]
    if not nchwc:
        pytest.skip("onnxruntime did not use its NCHWc layout on this machine")
    report = reluscope.analyze(blocked, calib_path)
    assert [item["name"] for item in report.unanalysed] == nchwc
    assert all("NCHWc layout" in item["reason"] and item["op"] == "relu" for item in report.unanalysed)
    assert [layer["op"] for layer in report.layers] == ["relu"]  # the FusedGemm is still measured
