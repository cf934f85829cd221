"""Activations as exporters decompose them: one site per activation, measured as the undecomposed op.

Each graph is written with `onnx.helper` the way an exporter writes it (paddle2onnx, older torch
exports, tf2onnx, Hugging Face `gelu_new`, JAX) and analysed next to the same graph with the
activation as one ONNX op: the reports must agree on the op, the dead units and the zero fraction,
and on ranges and means to float tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import reluscope

CHANNELS = 6
DEAD_CHANNELS = [1, 4]
Nodes = Callable[[str, str], list[onnx.NodeProto]]  # (x, y) -> the nodes computing y = act(x)


def const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


def conv_model(activation: Nodes, opset: int, path: Path) -> Path:
    """x -> Conv (channels 1 and 4 biased far below zero: dead after any ReLU-family op) -> activation -> y."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32) * 0.6
    b = rng.normal(size=CHANNELS).astype(np.float32)
    b[DEAD_CHANNELS] = -100.0
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["pre"], pads=[1, 1, 1, 1], name="conv"),
             *activation("pre", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", CHANNELS, 6, 6])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def single(op: str, **attrs: object) -> Nodes:
    return lambda x, y: [helper.make_node(op, [x], [y], name="act", **attrs)]


# ------------------------------------------------------------------------------------ decomposed forms
def hardswish_clip_div(x: str, y: str) -> list[onnx.NodeProto]:
    """x * Clip(x + 3, 0, 6) / 6 (paddle2onnx; torch's symbolic before opset 14)."""
    return [const("three", 3.0), const("zero", 0.0), const("six", 6.0),
            helper.make_node("Add", [x, "three"], ["shifted"]), helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
            helper.make_node("Mul", [x, "clipped"], ["product"]), helper.make_node("Div", ["product", "six"], [y], name="hs")]


def hardswish_gate_first(x: str, y: str) -> list[onnx.NodeProto]:
    """(Clip(x + 3, 0, 6) / 6) * x: the gate computed first, x on the right."""
    return [const("three", 3.0), const("zero", 0.0), const("six", 6.0),
            helper.make_node("Add", ["three", x], ["shifted"]), helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
            helper.make_node("Div", ["clipped", "six"], ["gate"]), helper.make_node("Mul", ["gate", x], [y], name="hs")]


def hardswish_tf(x: str, y: str) -> list[onnx.NodeProto]:
    """x * Min(Max(x + 3, 0), 6) * 0.16666667 (TensorFlow's relu6 as tf2onnx writes it)."""
    return [const("three", 3.0), const("zero", 0.0), const("six", 6.0), const("sixth", 1 / 6),
            helper.make_node("Add", [x, "three"], ["shifted"]), helper.make_node("Max", ["shifted", "zero"], ["low"]),
            helper.make_node("Min", ["low", "six"], ["relu6"]), helper.make_node("Mul", [x, "relu6"], ["product"]),
            helper.make_node("Mul", ["product", "sixth"], [y], name="hs")]


def hardswish_hardsigmoid(x: str, y: str) -> list[onnx.NodeProto]:
    """x * HardSigmoid(x, alpha=1/6) (torch's exporter at opsets 11-13)."""
    return [helper.make_node("HardSigmoid", [x], ["gate"], alpha=1 / 6), helper.make_node("Mul", [x, "gate"], [y], name="hs")]


def hardswish_clip_attributes(x: str, y: str) -> list[onnx.NodeProto]:
    """Opset 8: Clip's bounds are attributes."""
    return [const("three", 3.0), const("six", 6.0),
            helper.make_node("Add", [x, "three"], ["shifted"]), helper.make_node("Clip", ["shifted"], ["clipped"], min=0.0, max=6.0),
            helper.make_node("Mul", [x, "clipped"], ["product"]), helper.make_node("Div", ["product", "six"], [y], name="hs")]


def silu_sigmoid(x: str, y: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Sigmoid", [x], ["gate"]), helper.make_node("Mul", [x, "gate"], [y], name="silu")]


def silu_scaled_by_one(x: str, y: str) -> list[onnx.NodeProto]:
    """Mul(x, Sigmoid(Mul(x, 1.0))): Keras' swish with beta = 1."""
    return [const("one", 1.0), helper.make_node("Mul", [x, "one"], ["scaled"]),
            helper.make_node("Sigmoid", ["scaled"], ["gate"]), helper.make_node("Mul", [x, "gate"], [y], name="silu")]


def gelu_erf_div(x: str, y: str) -> list[onnx.NodeProto]:
    """((x * (Erf(x / sqrt 2) + 1)) * 0.5: torch's exporter before opset 20."""
    return [const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5),
            helper.make_node("Div", [x, "sqrt2"], ["scaled"]), helper.make_node("Erf", ["scaled"], ["erf"]),
            helper.make_node("Add", ["erf", "one"], ["shifted"]), helper.make_node("Mul", [x, "shifted"], ["product"]),
            helper.make_node("Mul", ["product", "half"], [y], name="gelu")]


def gelu_erf_half_first(x: str, y: str) -> list[onnx.NodeProto]:
    """(0.5 * x) * (1 + Erf(x * 0.70710677))."""
    return [const("rsqrt2", 0.70710677), const("one", 1.0), const("half", 0.5),
            helper.make_node("Mul", ["half", x], ["half_x"]), helper.make_node("Mul", [x, "rsqrt2"], ["scaled"]),
            helper.make_node("Erf", ["scaled"], ["erf"]), helper.make_node("Add", ["one", "erf"], ["shifted"]),
            helper.make_node("Mul", ["half_x", "shifted"], [y], name="gelu")]


def gelu_tanh_pow(x: str, y: str) -> list[onnx.NodeProto]:
    """0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))): Hugging Face `gelu_new`, Keras approximate=True."""
    return [const("three", 3.0), const("c", 0.044715), const("k", math.sqrt(2 / math.pi)), const("one", 1.0),
            const("half", 0.5),
            helper.make_node("Pow", [x, "three"], ["cube"]), helper.make_node("Mul", ["c", "cube"], ["cubic"]),
            helper.make_node("Add", [x, "cubic"], ["inner"]), helper.make_node("Mul", ["k", "inner"], ["arg"]),
            helper.make_node("Tanh", ["arg"], ["tanh"]), helper.make_node("Add", ["one", "tanh"], ["shifted"]),
            helper.make_node("Mul", ["half", x], ["half_x"]), helper.make_node("Mul", ["half_x", "shifted"], [y], name="gelu")]


def gelu_tanh_jax(x: str, y: str) -> list[onnx.NodeProto]:
    """JAX's form: x**3 as x*x*x, the constant folded in as sqrt(2/pi)*0.044715, and the half applied last."""
    a = math.sqrt(2 / math.pi)
    return [const("a", a), const("cubic_coef", a * 0.044715), const("one", 1.0), const("half", 0.5),
            helper.make_node("Mul", [x, x], ["square"]), helper.make_node("Mul", ["square", x], ["cube"]),
            helper.make_node("Mul", ["cube", "cubic_coef"], ["cubic"]), helper.make_node("Mul", [x, "a"], ["linear"]),
            helper.make_node("Add", ["linear", "cubic"], ["arg"]), helper.make_node("Tanh", ["arg"], ["tanh"]),
            helper.make_node("Add", ["tanh", "one"], ["shifted"]), helper.make_node("Mul", [x, "shifted"], ["product"]),
            helper.make_node("Mul", ["product", "half"], [y], name="gelu")]


def mish_softplus(x: str, y: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Softplus", [x], ["sp"]), helper.make_node("Tanh", ["sp"], ["t"]),
            helper.make_node("Mul", [x, "t"], [y], name="mish")]


CASES = [
    ("hardswish-clip-div", hardswish_clip_div, 13, single("HardSwish"), 14, "hardswish"),
    ("hardswish-gate-first", hardswish_gate_first, 13, single("HardSwish"), 14, "hardswish"),
    ("hardswish-tf-min-max", hardswish_tf, 13, single("HardSwish"), 14, "hardswish"),
    ("hardswish-hardsigmoid", hardswish_hardsigmoid, 13, single("HardSwish"), 14, "hardswish"),
    ("hardswish-opset8-clip", hardswish_clip_attributes, 8, single("HardSwish"), 14, "hardswish"),
    ("silu-sigmoid", silu_sigmoid, 13, single("Swish"), 24, "silu"),
    ("silu-times-one", silu_scaled_by_one, 13, single("Swish"), 24, "silu"),
    ("gelu-erf-div", gelu_erf_div, 13, single("Gelu"), 20, "gelu"),
    ("gelu-erf-half-first", gelu_erf_half_first, 13, single("Gelu"), 20, "gelu"),
    ("gelu-tanh-pow", gelu_tanh_pow, 13, single("Gelu", approximate="tanh"), 20, "gelu"),
    ("gelu-tanh-jax", gelu_tanh_jax, 13, single("Gelu", approximate="tanh"), 20, "gelu"),
    ("mish-softplus-tanh", mish_softplus, 13, single("Mish"), 18, "mish"),
]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    # Pre-activations stay above about -4 (but for the dead channels): below, 1 + tanh(.) rounds to a few ulps and
    # the tanh GELU's sign there is noise, in onnxruntime's Gelu op as in its decomposition
    return (np.random.default_rng(1).normal(size=(24, 3, 6, 6)) * 0.5).astype(np.float32)


@pytest.mark.parametrize("name, decomposed, opset, whole, whole_opset, op", CASES, ids=[c[0] for c in CASES])
def test_decomposed_activation_is_one_site_measured_as_the_op(name: str, decomposed: Nodes, opset: int, whole: Nodes,
                                                             whole_opset: int, op: str, data: np.ndarray,
                                                             tmp_path: Path) -> None:
    ours = reluscope.analyze(conv_model(decomposed, opset, tmp_path / f"{name}.onnx"), data, batch_size=10)
    ref = reluscope.analyze(conv_model(whole, whole_opset, tmp_path / "whole.onnx"), data, batch_size=10)
    assert [layer["op"] for layer in ours.layers] == [layer["op"] for layer in ref.layers] == [op]
    mine, theirs = ours.layers[0], ref.layers[0]
    assert mine["tensor"] == "y" and mine["unit_axis"] == theirs["unit_axis"] == 0
    assert mine["dead_units"] == theirs["dead_units"] == DEAD_CHANNELS
    assert mine["zero_fraction"] == theirs["zero_fraction"]
    assert mine["rarely_active_units"] == theirs["rarely_active_units"]
    assert mine["dormant_units"] == theirs["dormant_units"]
    for key in ("min", "max", "mean", "std"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key
    assert not ours.unanalysed


def test_hardswish_is_not_reported_as_the_relu6_inside_it(data: np.ndarray, tmp_path: Path) -> None:
    """Before, the inner Clip was a relu6 site measuring relu6(x + 3): no dead units where hardswish had them."""
    report = reluscope.analyze(conv_model(hardswish_clip_div, 13, tmp_path / "hs.onnx"), data)
    assert [layer["op"] for layer in report.layers] == ["hardswish"]
    assert report.layers[0]["dead_units"] == DEAD_CHANNELS


def test_near_misses_stay_apart(data: np.ndarray, tmp_path: Path) -> None:
    """x*Clip(x+3, 0, 6) without the /6 and 0.5*x*(1+Erf(x)) are no hardswish or GELU: the Clip stays a relu6
    site and the Erf form no site at all."""
    def not_hardswish(x: str, y: str) -> list[onnx.NodeProto]:
        return [const("three", 3.0), const("zero", 0.0), const("six", 6.0),
                helper.make_node("Add", [x, "three"], ["shifted"]),
                helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"], name="clip"),
                helper.make_node("Mul", [x, "clipped"], [y])]

    def not_gelu(x: str, y: str) -> list[onnx.NodeProto]:
        return [const("one", 1.0), const("half", 0.5), helper.make_node("Erf", [x], ["erf"]),
                helper.make_node("Add", ["erf", "one"], ["shifted"]), helper.make_node("Mul", [x, "shifted"], ["p"]),
                helper.make_node("Mul", ["p", "half"], [y])]

    assert [(l["name"], l["op"]) for l in reluscope.analyze(conv_model(not_hardswish, 13, tmp_path / "a.onnx"),
                                                            data).layers] == [("clip", "relu6")]
    report = reluscope.analyze(conv_model(not_gelu, 13, tmp_path / "b.onnx"), data)
    assert report.layers == []


# ------------------------------------------------------------------------------------ statistics
def layer_norm_model(path: Path) -> Path:
    """MatMul -> a LayerNorm written out (mean, variance clamped with Max(var, 0), as some exporters and
    hand-written norms do) -> Relu; plus a mean over time (features kept) -> Relu."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    nodes = [
        const("zero", 0.0), const("eps", 1e-5), const("two", 2.0),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h", "mean"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["squares"]),
        helper.make_node("ReduceMean", ["squares"], ["var_raw"], axes=[-1], keepdims=1),
        helper.make_node("Max", ["var_raw", "zero"], ["var"], name="variance_clamp"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normed"]),
        helper.make_node("Relu", ["normed"], ["y"], name="relu"),
        helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Relu", ["pooled"], ["z"], name="pooled_relu"),
        helper.make_node("ReduceMean", ["h"], ["energy"], axes=[-1], keepdims=0),
        helper.make_node("Relu", ["energy"], ["e"], name="energy_relu"),
    ]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 8]),
                               helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_clamps_of_statistics_are_not_sites(tmp_path: Path) -> None:
    """Max(var, 0) and a Relu of a per-position mean over the features clamp statistics, not features; a Relu of a
    mean over time still sees every feature."""
    x = np.random.default_rng(3).normal(size=(12, 5, 8)).astype(np.float32)
    report = reluscope.analyze(layer_norm_model(tmp_path / "ln.onnx"), x)
    assert [(layer["name"], layer["op"], layer["units"]) for layer in report.layers] == [
        ("relu", "relu", 8), ("pooled_relu", "relu", 8)]
