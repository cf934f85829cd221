"""ONNX graphs: load and validate a file, list its ReLU-family sites and each site's unit layout.

Sites are read off the graph as onnxruntime will run it, never converted to PyTorch. Op
labels match the torch table (`reluscope.sites`), so one model gives the same report whether
it is analysed as a checkpoint or as its ONNX export.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..base import LoadedModel
from ...errors import InputError, first_line
from ...measure.sites import CHANNEL, LAST, Activation, activation, clamped

_DEFAULT_DOMAINS = ("", "ai.onnx")

_SIMPLE_OPS = {  # op_type -> Activation, for ops that are a site by themselves
    op_type: activation(label) for op_type, label in (
        ("Relu", "relu"), ("LeakyRelu", "leaky_relu"), ("PRelu", "prelu"), ("Elu", "elu"), ("Selu", "selu"),
        ("Celu", "celu"), ("Gelu", "gelu"), ("HardSwish", "hardswish"), ("Mish", "mish"), ("Swish", "silu"),
        ("HardSigmoid", "hardsigmoid"))
}
# onnxruntime's contrib ops, as written by its transformer optimizer.
_MICROSOFT_OPS = {op: activation("gelu") for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")}
# ... and by its graph optimizer (a model saved with `optimized_model_filepath`): a convolution or
# matrix product with the activation folded in (`activation` attribute). The site is the fused
# node's output; its units lie where the layer writes them.
_FUSED_LAYERS = {"FusedConv": CHANNEL, "NhwcFusedConv": LAST, "FusedGemm": LAST}
# At ORT_ENABLE_ALL the optimizer also writes convolutions in a blocked, machine-specific layout
# (N, C/8, H, W, 8), channels padded: listed as unanalysed rather than measured wrongly.
_NCHWC_DOMAIN = "com.microsoft.nchwc"
_NCHWC_REASON = ("in onnxruntime's machine-specific NCHWc layout (a model saved at ORT_ENABLE_ALL); analyse the "
                 "model before optimization, or one saved at ORT_ENABLE_EXTENDED")

# Producers: convolutions write units on the channel axis, matrix products on the last one.
_CHANNEL_PRODUCERS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})
_LAST_PRODUCERS = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "Einsum", "FusedMatMul"})
# Per-element ops keep their input's unit layout (the ONNX forms of sites.PASSTHROUGH_OPS, plus
# the activations themselves, as the torch capture tags an activation's output with its input's).
_PASSTHROUGH = frozenset(
    {"BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Dropout",
     "Identity", "Cast", "Neg", "Add", "Sub", "Mul", "Div", "QuantizeLinear", "DequantizeLinear", "Clip", "Max",
     "ThresholdedRelu", "Sigmoid", "Tanh", "Softplus", "Erf"} | set(_SIMPLE_OPS)
)
_LAYOUT_DEPTH = 32
_CONTROL_FLOW_REASON = ("inside the {attr} subgraph of {op} node {node!r}; onnxruntime returns no tensors from "
                        "inside control flow")


@dataclass(frozen=True)
class OnnxSite:
    name: str  # the node's name, or its output tensor's name when the node has none
    tensor: str  # the site's output tensor
    input: str  # the activation's input tensor (PReLU's active region is read from it)
    activation: Activation
    layout: str | None  # recorder.CHANNEL / recorder.LAST / None (rank heuristic)
    module: str | None = None  # the PyTorch site name, from the exporter's metadata (see torch_site_names)



def load_onnx(path: Path) -> LoadedModel:
    """Load an ONNX file with its external weights (from the file's folder) and validate it."""
    try:
        model = onnx.load(str(path), load_external_data=True)
    except DecodeError as exc:
        raise InputError(f"{path} is not an ONNX model (its bytes do not parse as one, the file may be truncated "
                         "or of another format); re-export or re-copy the model") from exc
    except onnx.checker.ValidationError as exc:  # raised for missing or unreadable external data
        raise InputError(f"cannot read the external weights of ONNX model {path}: {first_line(exc)}; keep the "
                         "model's data file(s) next to it") from exc
    except OSError as exc:
        raise InputError(f"cannot read ONNX model {path}: {exc.strerror or first_line(exc)}") from exc
    try:
        # From the path: the check then also covers external data, and never serializes the model (which
        # fails past protobuf's 2 GB limit and costs more than the checker's own read of the file)
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, DecodeError) as exc:
        raise InputError(f"{path} is not a valid ONNX model: {first_line(exc)}; re-export it") from exc
    if not model.graph.node:
        raise InputError(f"{path} is not a usable ONNX model: its graph has no nodes; re-export it")
    return LoadedModel(model, "onnx")


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model-local functions inlined, so that sites inside them are nodes of the main graph."""
    return onnx.inliner.inline_local_functions(model) if model.functions else model


def true_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: old exporters (IR < 4) also list every initializer as an input."""
    initializers = {init.name for init in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)


class _Graph:
    """Producer and constant lookups over one graph."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.opset = opset
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.initializers = {init.name: init for init in graph.initializer}
        self._layouts: dict[str, str | None] = {}

    def scalar(self, name: str) -> float | None:
        """The value of a one-element initializer or Constant node output, else None."""
        if name in self.initializers:
            tensor = self.initializers[name]
        else:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or not node.attribute:
                return None
            tensor = onnx.helper.get_attribute_value(node.attribute[0])  # value, value_float, value_ints...
            if not isinstance(tensor, onnx.TensorProto):
                values = np.ravel(tensor)
                return float(values[0]) if values.size == 1 and values.dtype.kind in "iuf" else None
        if math.prod(tensor.dims) != 1:  # checked before decoding: weights can be large
            return None
        value = numpy_helper.to_array(tensor)
        return float(value.reshape(-1)[0]) if value.dtype.kind in "biuf" else None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or getattr(self.producer.get(name), "op_type", None) == "Constant"

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def layout(self, tensor: str, depth: int = 0) -> str | None:
        """Walk back through per-element ops to the layer that produced `tensor`."""
        if tensor in self._layouts:
            return self._layouts[tensor]
        node = self.producer.get(tensor)
        result = None
        if node is not None:
            if node.op_type in _CHANNEL_PRODUCERS:
                result = CHANNEL
            elif node.op_type in _LAST_PRODUCERS:
                result = LAST
            elif node.op_type in _PASSTHROUGH and depth < _LAYOUT_DEPTH:
                # the first non-constant operand with a known layout, as the torch capture does
                for inp in node.input:
                    if inp and not self.is_constant(inp):
                        result = self.layout(inp, depth + 1)
                        if result is not None:
                            break
        self._layouts[tensor] = result
        return result

    # --------------------------------------------------------------- patterns
    def clip(self, node: onnx.NodeProto) -> Activation | None:
        """Clip(min=0): ReLU6 when max is 6, clamp otherwise; any other min is no site."""
        if self.opset < 11:
            attrs = {a.name: a.f for a in node.attribute}
            low, high = attrs.get("min"), attrs.get("max")
        else:
            low = self.scalar(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            has_max = len(node.input) > 2 and bool(node.input[2])
            high = self.scalar(node.input[2]) if has_max else None
            if has_max and high is None:
                return None  # a tensor bound: no fixed saturation level
        if low != 0:
            return None
        return clamped(high)

    def gate(self, node: onnx.NodeProto) -> tuple[str, onnx.NodeProto] | None:
        """Mul(x, g(x)): SiLU (g = Sigmoid), Mish (Tanh(Softplus)), HardSwish (HardSigmoid(1/6, 1/2)).

        Returns the op label and the gate node (which is then not a site of its own)."""
        if node.op_type != "Mul" or len(node.input) != 2:
            return None
        for x, gated in (node.input, reversed(node.input)):
            g = self.producer.get(gated)
            if g is None or not g.input:
                continue
            if g.op_type == "Sigmoid" and g.input[0] == x:
                return "silu", g
            if g.op_type == "HardSigmoid" and g.input[0] == x:
                attrs = {a.name: a.f for a in g.attribute}
                if math.isclose(attrs.get("alpha", 0.2), 1 / 6, rel_tol=1e-4) and attrs.get("beta", 0.5) == 0.5:
                    return "hardswish", g
            if g.op_type == "Tanh":
                softplus = self.op(g.input[0], "Softplus")
                if softplus is not None and softplus.input[0] == x:
                    return "mish", g
        return None

    def erf_gelu(self, node: onnx.NodeProto) -> str | None:
        """The exact GELU as older exporters decompose it: Mul(Mul(x, Add(Erf(x / sqrt 2), 1)), 0.5).

        Returns x when `node` is the final Mul of that pattern."""
        if node.op_type != "Mul" or len(node.input) != 2:
            return None
        half = [i for i in node.input if self.scalar(i) == 0.5]
        if len(half) != 1:
            return None
        inner = self.op(next(i for i in node.input if i != half[0]), "Mul")
        if inner is None:
            return None
        for x, other in (inner.input, reversed(inner.input)):
            add = self.op(other, "Add")
            if add is None or not any(self.scalar(i) == 1 for i in add.input):
                continue
            erf = next((self.op(i, "Erf") for i in add.input if self.op(i, "Erf") is not None), None)
            scaled = None if erf is None else self.producer.get(erf.input[0])
            if scaled is None or x not in scaled.input:
                continue
            factor = self.scalar(next((i for i in scaled.input if i != x), ""))
            if (scaled.op_type == "Div" and factor is not None and math.isclose(factor, math.sqrt(2), rel_tol=1e-3)
                    or scaled.op_type == "Mul" and factor is not None
                    and math.isclose(factor, 1 / math.sqrt(2), rel_tol=1e-3)):
                return x
        return None


def _fused_activation(node: onnx.NodeProto) -> Activation | None:
    """The ReLU-family activation folded into an onnxruntime FusedConv/FusedGemm, if any."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kind = attrs.get("activation", b"")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    params = list(attrs.get("activation_params", []))
    if kind == "Relu":
        return activation("relu")
    if kind == "LeakyRelu":
        return activation("leaky_relu")
    if kind == "Clip" and len(params) == 2 and params[0] == 0:
        return clamped(float(params[1]))
    if kind == "HardSigmoid":
        return activation("hardsigmoid")
    return None  # Sigmoid, Tanh, a Clip with another minimum: not ReLU-family


def _classify(node: onnx.NodeProto, graph: _Graph) -> tuple[Activation, str] | None:
    """(activation, input tensor) when `node` is a site."""
    if node.domain == "com.microsoft":
        act = _fused_activation(node) if node.op_type in _FUSED_LAYERS else _MICROSOFT_OPS.get(node.op_type)
        return (act, node.input[0]) if act is not None else None
    if node.domain not in _DEFAULT_DOMAINS or not node.input:
        return None
    op = node.op_type
    if op in _SIMPLE_OPS:
        return _SIMPLE_OPS[op], node.input[0]
    if op == "ThresholdedRelu":
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        return Activation("thresholded_relu", hard_zero=alpha >= 0), node.input[0]
    if op == "Clip":
        act = graph.clip(node)
        return (act, node.input[0]) if act is not None else None
    if op == "Max" and len(node.input) == 2:  # torch.clamp(x, min=0) exports as Max(x, 0)
        zero = [i for i in node.input if graph.scalar(i) == 0]
        if len(zero) == 1:
            return clamped(None), next(i for i in node.input if i != zero[0])
        return None
    gated = graph.gate(node)
    if gated is not None:
        return activation(gated[0]), next(i for i in node.input if i != gated[1].output[0])
    x = graph.erf_gelu(node)
    return (activation("gelu"), x) if x is not None else None


def _gates(graph_proto: onnx.GraphProto, graph: _Graph) -> set[str]:
    """Output tensors of the gates of Mul(x, g(x)) patterns: part of a site, not sites themselves."""
    return {gated[1].output[0] for node in graph_proto.node if (gated := graph.gate(node)) is not None}


def _sites_of(graph_proto: onnx.GraphProto, opset: int) -> Iterator[tuple[onnx.NodeProto, Activation, str, _Graph]]:
    graph = _Graph(graph_proto, opset)
    gates = _gates(graph_proto, graph)
    for node in graph_proto.node:
        if node.output and node.output[0] in gates:
            continue
        found = _classify(node, graph)
        if found is not None:
            yield node, found[0], found[1], graph


def _site_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _control_flow_sites(graph_proto: onnx.GraphProto, opset: int) -> Iterator[dict[str, Any]]:
    """Sites inside If/Loop/Scan bodies (at any depth), each with the reason it is not measured."""
    for node in graph_proto.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                reason = _CONTROL_FLOW_REASON.format(attr=attr.name, op=node.op_type, node=_site_name(node))
                for inner, act, _, _ in _sites_of(body, opset):
                    yield {"name": _site_name(inner), "op": act.op, "reason": reason}
                yield from _control_flow_sites(body, opset)


def find_sites(model: onnx.ModelProto) -> tuple[list[OnnxSite], list[dict[str, Any]]]:
    """Sites of the main graph in graph (execution) order, and the sites it cannot expose."""
    opset = default_opset(model)
    found = list(_sites_of(model.graph, opset))
    modules = torch_site_names([(node, act) for node, act, _, _ in found])
    sites = [OnnxSite(_site_name(node), node.output[0], inp, act, _layout_of(node, inp, graph), module)
             for (node, act, inp, graph), module in zip(found, modules)]
    blocked = [{"name": _site_name(node), "op": act.op, "reason": _NCHWC_REASON} for node in model.graph.node
               if node.domain == _NCHWC_DOMAIN and (act := _fused_activation(node)) is not None]
    return sites, blocked + list(_control_flow_sites(model.graph, opset))


def _layout_of(node: onnx.NodeProto, inp: str, graph: _Graph) -> str | None:
    """Where a site's units lie: a fused layer knows; otherwise the layer that produced its input."""
    if node.domain == "com.microsoft" and node.op_type in _FUSED_LAYERS:
        return _FUSED_LAYERS[node.op_type]
    return graph.layout(inp)


def torch_site_names(nodes: list[tuple[onnx.NodeProto, Activation]]) -> list[str | None]:
    """What the PyTorch path would call each site, from the dynamo exporter's per-node metadata
    (`pkg.torch.onnx.name_scopes`: module qualnames, `...class_hierarchy`: their classes), so that
    `node_relu_2` can be traced back to `features.3`. None for graphs without that metadata.
    The exporter may fold sites away (relu(relu(x)) becomes one Relu), so names, not positions,
    are what relate the two reports."""
    import ast

    from ...measure.sites import call_names, functional_site_name, is_activation_module

    bases: list[str | None] = []
    for node, act in nodes:
        props = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(props["pkg.torch.onnx.name_scopes"])
            classes = ast.literal_eval(props["pkg.torch.onnx.class_hierarchy"])
        except (KeyError, ValueError, SyntaxError):
            bases.append(None)
            continue
        path = scopes[-2] if len(scopes) >= 3 else ""  # [root "", module qualnames..., the aten node]
        owner = classes[-2] if len(classes) >= 2 else ""
        bases.append(path if path and is_activation_module(owner) else functional_site_name(path, act.op))
    return call_names(bases)
