"""reluscope prune on ONNX graphs: real exported models whose dead units are made so by construction.

Each model is exported with torch.onnx's dynamo exporter (or built with onnx.helper where torch
cannot express the case), analysed with reluscope.analyze for its dead units, pruned through the
ONNX backend, and compared with the original on the calibration data and on other inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import reluscope
from reluscope.backends import open_model
from reluscope.backends.base import PruneRequest
from reluscope.data import Batch
from reluscope.errors import UsageError

from test_onnx import export

DEAD = -100.0


def kill(layer: nn.Module, units: list[int]) -> None:
    """Units whose pre-activation is -100 on any input: zero weights, a very negative bias."""
    with torch.no_grad():
        layer.weight[units] = 0
        layer.bias[units] = DEAD


def data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def dead_units(path: Path, x: np.ndarray) -> dict[str, list[int]]:
    report = reluscope.analyze(str(path), x)
    return {layer["name"]: list(layer["dead_units"]) for layer in report.layers if layer["dead_units"]}


def prune(path: Path, x: np.ndarray, tolerance: float = 1e-5, candidates: dict[str, list[int]] | None = None):
    backend = open_model(path)
    candidates = dead_units(path, x) if candidates is None else candidates
    request = PruneRequest(candidates, [Batch((x[:16],), None, 16), Batch((x[16:],), None, len(x) - 16)], tolerance)
    return backend, backend.prune(request), candidates


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def assert_same_outputs(original: onnx.ModelProto, pruned: onnx.ModelProto, *inputs: np.ndarray,
                        tolerance: float = 1e-6) -> None:
    onnx.checker.check_model(pruned)
    for x in inputs:
        for a, b in zip(run(original, x), run(pruned, x)):
            assert a.shape == b.shape
            assert np.max(np.abs(a - b)) <= tolerance * max(1.0, float(np.max(np.abs(a))))


def parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


# models ---------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 10), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(10, 8), nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_mlp_dead_units_go_and_outputs_stay(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    kill(model.fc1, [1, 4, 7])
    kill(model.fc2, [2, 5])
    path = export(model, torch.randn(4, 6), tmp_path / "mlp.onnx")
    x = data((40, 6))
    backend, result, candidates = prune(path, x)
    assert set(candidates["act1"]) >= {1, 4, 7} and set(candidates["act2"]) >= {2, 5}
    assert result.removed == candidates
    assert result.kept == {"act1": {}, "act2": {}}
    assert result.check.passed(1e-6)
    assert_same_outputs(backend.loaded.module, result.model, x, data((7, 6), seed=3) * 5)
    # exactly the removed rows and columns: fc1's rows and biases, fc2's columns, rows and biases, head's columns
    n1, n2 = len(candidates["act1"]), len(candidates["act2"])
    removed = n1 * 6 + n1 + (8 * 10 - (8 - n2) * (10 - n1)) + n2 + n2 * 3
    assert parameters(backend.loaded.module) - parameters(result.model) == removed
    batch = Batch((x,), None, 40)
    before, after = backend.cost(backend.loaded.module, batch), backend.cost(result.model, batch)
    assert before["parameters"] - after["parameters"] == removed
    assert before["macs"] == 6 * 10 + 10 * 8 + 8 * 3
    assert after["macs"] == 6 * (10 - n1) + (10 - n1) * (8 - n2) + (8 - n2) * 3
    assert after["latency_ms"] > 0
    assert backend.serialize(result.model, ".onnx", batch) == result.model.SerializeToString()
    with pytest.raises(UsageError, match=r"only be written as \.onnx \(got \.pt\)"):
        backend.serialize(result.model, ".pt", batch)


class ConvBN(nn.Module):
    """conv -> relu -> BN (after the ReLU: a dead unit reads as BN's constant shift) -> conv -> flatten -> Linear."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv1, self.relu1, self.bn = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8)
        self.conv2, self.relu2 = nn.Conv2d(8, 6, 3, padding=padding), nn.ReLU()
        side = 4 if padding == 0 else 6
        self.fc = nn.Linear(6 * side * side, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu2(self.conv2(self.bn(self.relu1(self.conv1(x)))))
        return self.fc(torch.flatten(y, 1))


def conv_bn(padding: int, tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = ConvBN(padding)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-1, 1)
    kill(model.conv1, [0, 5])
    kill(model.conv2, [3])
    return export(model, torch.randn(2, 3, 8, 8), tmp_path / f"convbn{padding}.onnx")


def test_conv_bn_conv_folds_the_batch_norm_shift_into_the_next_bias(tmp_path: Path) -> None:
    path = conv_bn(0, tmp_path)
    x = data((32, 3, 8, 8))
    backend, result, candidates = prune(path, x)
    assert candidates["relu1"] == [0, 5] and 3 in candidates["relu2"]
    assert result.removed == candidates
    assert result.check.passed(1e-5)
    # only on the calibration data: some of relu2's units are dead there by chance, not by construction
    assert_same_outputs(backend.loaded.module, result.model, x, tolerance=1e-5)
    # relu2 -> flatten -> Gemm: channel 3 is 16 features of fc's input
    weights = {init.name: init for init in result.model.graph.initializer}
    assert list(weights["fc.weight"].dims) == [5, (6 - len(candidates["relu2"])) * 16]
    original = open_model(path).cost(backend.loaded.module, Batch((x,), None, 32))
    after = backend.cost(result.model, Batch((x,), None, 32))
    assert after["macs"] < original["macs"] and after["parameters"] < original["parameters"]


def test_a_padded_conv_fold_is_kept_when_inexact_at_the_borders(tmp_path: Path) -> None:
    path = conv_bn(1, tmp_path)
    x = data((32, 3, 8, 8))
    backend, result, _ = prune(path, x, tolerance=1e-6)
    reasons = result.kept["relu1"]
    # BN's shift is not 0: conv2's zero padding sees 0 where the removed channel held the shift
    assert set(reasons) == {0, 5}, reasons
    assert all("padded convolution" in r and "borders" in r for r in reasons.values()), reasons
    assert result.removed["relu1"] == [] and 3 in result.removed["relu2"]
    assert_same_outputs(backend.loaded.module, result.model, x, tolerance=1e-5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu0 = nn.Conv2d(3, 6, 1), nn.ReLU()
        self.conv, self.relu1 = nn.Conv2d(6, 6, 1), nn.ReLU()
        self.relu2 = nn.ReLU()
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu0(self.stem(x))
        return self.head(self.relu2(a + self.relu1(self.conv(a))))


def test_residual_units_go_only_when_dead_at_every_coupled_site(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = Residual()
    kill(model.stem, [1, 4])
    kill(model.conv, [4, 5])  # 4: dead on both branches; 1 and 5: dead on one only
    path = export(model, torch.randn(2, 3, 5, 5), tmp_path / "residual.onnx")
    x = data((24, 3, 5, 5))
    backend, result, candidates = prune(path, x)
    assert candidates["relu0"] == [1, 4] and candidates["relu1"] == [4, 5]
    assert result.removed["relu0"] == [4] and result.removed["relu1"] == [4] and result.removed["relu2"] == [4]
    assert result.kept["relu0"][1] == "active at coupled site relu1"
    assert result.kept["relu1"][5] == "active at coupled site relu0"
    assert_same_outputs(backend.loaded.module, result.model, x, data((3, 3, 5, 5), seed=4))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 6, 1), nn.ReLU()
        self.dw, self.relu_dw = nn.Conv2d(6, 6, 3, groups=6), nn.ReLU()
        self.pw = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.relu_dw(self.dw(self.relu(self.conv(x)))))


def test_a_depthwise_conv_passes_its_channels_through(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Depthwise()
    kill(model.conv, [2])
    kill(model.dw, [2, 3])
    path = export(model, torch.randn(2, 3, 6, 6), tmp_path / "dw.onnx")
    x = data((20, 3, 6, 6))
    backend, result, candidates = prune(path, x)
    assert candidates == {"relu": [2], "relu_dw": [2, 3]}
    assert result.removed == {"relu": [2], "relu_dw": [2]}
    assert result.kept["relu_dw"][3] == "active at coupled site relu"
    dw = next(n for n in result.model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in dw.attribute if a.name == "group") == 5
    assert_same_outputs(backend.loaded.module, result.model, x, data((3, 3, 6, 6), seed=5))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.relu_a = nn.Conv2d(3, 4, 1), nn.ReLU()
        self.b, self.relu_b = nn.Conv2d(3, 5, 1), nn.ReLU()
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.relu_a(self.a(x)), self.relu_b(self.b(x))], dim=1))


def test_concat_maps_each_input_to_its_offset(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = Concat()
    kill(model.a, [3])
    kill(model.b, [0, 4])
    path = export(model, torch.randn(2, 3, 4, 4), tmp_path / "cat.onnx")
    x = data((20, 3, 4, 4))
    backend, result, candidates = prune(path, x)
    assert result.removed == candidates == {"relu_a": [3], "relu_b": [0, 4]}
    head = next(i for i in result.model.graph.initializer if i.name == "head.weight")
    assert list(head.dims) == [2, 6, 1, 1]
    kept_columns = [0, 1, 2, 5, 6, 7]
    original = numpy_helper.to_array(next(i for i in backend.loaded.module.graph.initializer if i.name == "head.weight"))
    assert np.array_equal(numpy_helper.to_array(head), original[:, kept_columns])
    assert_same_outputs(backend.loaded.module, result.model, x)


def test_nothing_dead_leaves_the_model_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(5)
    path = export(MLP(), torch.randn(4, 6), tmp_path / "alive.onnx")
    x = np.abs(data((24, 6))) + 0.1
    backend, result, candidates = prune(path, x, candidates={})
    assert result.removed == {} and result.kept == {}
    assert result.model.SerializeToString() == backend.loaded.module.SerializeToString()
    assert result.check.passed(0.0)


class ReluOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.relu = nn.Linear(4, 5), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


def test_a_space_that_reaches_the_graph_output_stays(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = ReluOut()
    kill(model.fc, [2])
    path = export(model, torch.randn(2, 4), tmp_path / "out.onnx")
    x = data((20, 4))
    backend, result, candidates = prune(path, x)
    assert candidates == {"relu": [2]}
    assert result.removed == {"relu": []}
    output = backend.loaded.module.graph.output[0].name
    assert result.kept["relu"][2] == f"reaches the graph output {output!r}"


def test_a_softmax_over_the_units_blocks_them(tmp_path: Path) -> None:
    """Built with onnx.helper: Gemm -> Relu -> Softmax."""
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    bias = np.array([0.1, DEAD, 0.2], dtype=np.float32)
    weight[:, 1] = 0
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("Softmax", ["r"], ["y"], name="sm", axis=-1)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    _, result, candidates = prune(path, data((20, 4)))
    assert candidates == {"act": [1]}
    assert result.kept["act"][1] == "reaches Softmax node 'sm', which reluscope cannot prune through"


class Tokens(nn.Module):
    """Linear layers on (batch, tokens, features): exported as MatMul + Add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(4, 6), nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)) + 0.5)


def test_matmul_with_a_bias_add_on_token_features(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = Tokens()
    kill(model.fc1, [0, 3])
    path = export(model, torch.randn(2, 5, 4), tmp_path / "tokens.onnx")
    x = data((20, 5, 4))
    backend, result, candidates = prune(path, x)
    assert candidates == {"act": [0, 3]}
    assert result.removed == candidates, result.kept
    assert "MatMul" in {n.op_type for n in result.model.graph.node}
    # the +0.5 reaches fc2 as a constant: folded into fc2's bias
    assert_same_outputs(backend.loaded.module, result.model, x, data((4, 5, 4), seed=8) * 4)


def test_matmul_without_bias_gets_an_add_for_the_folded_constant(tmp_path: Path) -> None:
    """Built with onnx.helper: MatMul + Add -> Relu -> Add 0.5 -> MatMul (no bias)."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    w1[:, 2], b1[2] = 0, DEAD
    w2 = rng.standard_normal((5, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
         helper.make_node("Relu", ["hb"], ["r"], name="act"),
         helper.make_node("Add", ["r", "half"], ["s"], name="shift"),
         helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.full(5, 0.5, dtype=np.float32), "half")])
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = data((24, 4))
    backend, result, candidates = prune(path, x)
    assert 2 in candidates["act"] and result.removed == candidates
    assert [n.op_type for n in result.model.graph.node].count("Add") == 3
    assert_same_outputs(backend.loaded.module, result.model, x)


class Mixed(nn.Module):
    """A dead ReLU unit added to a conv output that has no activation: the sum still varies."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.relu = nn.Conv2d(3, 4, 1), nn.ReLU()
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.a(x)) + self.b(x))


def test_a_unit_that_feeds_a_varying_value_stays(tmp_path: Path) -> None:
    torch.manual_seed(8)
    model = Mixed()
    kill(model.a, [1])
    path = export(model, torch.randn(2, 3, 4, 4), tmp_path / "mixed.onnx")
    x = data((16 + 8, 3, 4, 4))
    backend, result, candidates = prune(path, x)
    assert candidates == {"relu": [1]}
    assert result.removed == {"relu": []}
    reason = result.kept["relu"][1]
    assert reason.startswith("feeds Conv node") and "through Add node" in reason and reason.endswith("varying value")
    assert result.model.SerializeToString() == backend.loaded.module.SerializeToString()


def test_unknown_site_names_are_an_input_error(tmp_path: Path) -> None:
    from reluscope.errors import InputError

    torch.manual_seed(9)
    path = export(MLP(), torch.randn(2, 6), tmp_path / "mlp.onnx")
    with pytest.raises(InputError, match="has no site 'nope'"):
        prune(path, data((20, 6)), candidates={"nope": [1]})
