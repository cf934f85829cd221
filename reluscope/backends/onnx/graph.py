"""ONNX graphs: load and validate a file, list its ReLU-family sites and each site's unit layout.

Sites are read off the graph as onnxruntime will run it, never converted to PyTorch. Op
labels match the torch table (`reluscope.sites`), so one model gives the same report whether
it is analysed as a checkpoint or as its ONNX export.
"""

from __future__ import annotations

import math
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import chain
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..base import LoadedModel
from ...errors import InputError, first_line
from ...measure.sites import CHANNEL, LAST, Activation, activation, call_names, clamped, functional_site_name

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


@dataclass(frozen=True)
class OnnxSite:
    name: str  # the node's name, or its output tensor's name when the node has none
    tensor: str  # the site's output tensor
    input: str  # the activation's input tensor (PReLU's active region is read from it)
    activation: Activation
    layout: str | None  # recorder.CHANNEL / recorder.LAST / None (rank heuristic)
    module: str | None = None  # the PyTorch site name, from the exporter's metadata (see torch_site_names)
    node: str | None = None  # the node's name (the output tensor's when it has none)
    output: str | None = None  # inside an If branch: the main-graph output that carries `tensor` out
    output_input: str | None = None  # ... and `input` (PReLU)
    branch: str | None = None  # inside an If branch: which one ("the then_branch of If node 'gate'")

    @property
    def fetch(self) -> str:
        """The main-graph tensor holding the site's output."""
        return self.output or self.tensor

    @property
    def fetch_input(self) -> str:
        return self.output_input or self.input



def load_onnx(path: Path) -> LoadedModel:
    """Load an ONNX file with its external weights (from the file's folder) and validate it. The
    graph is read first without them, and what each external tensor claims is checked against its
    data file and its own shape (`_check_external_data`) before any byte of it is read."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        _check_external_data(model, path)
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except DecodeError as exc:
        raise InputError(f"{path} is not an ONNX model (its bytes do not parse as one, the file may be truncated "
                         "or of another format); re-export or re-copy the model") from exc
    except (onnx.checker.ValidationError, ValueError) as exc:  # missing, unreadable or out-of-bounds external data
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


_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, name)}


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data that `tensor`'s type and dims call for; None for types without a fixed size."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of `graph`: initializers (sparse ones too) and node attributes, in subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _all_tensors(body)


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external data whose claims do not hold, before anything is read: a 300-byte model may
    declare a 6 GiB tensor (onnx would allocate it), or a small tensor may point at a huge (sparse)
    file. Each tensor's bytes must be those its dims and type call for, lie inside a regular file
    beside the model, and the tensors together may not claim more than their files hold."""
    folder = path.parent
    sizes: dict[Path, int] = {}
    claimed = 0
    graphs = [model.graph, *[onnx.GraphProto(node=f.node) for f in model.functions]]
    for tensor in chain.from_iterable(_all_tensors(g) for g in graphs):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        kind = onnx.TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in onnx.TensorProto.DataType.values() \
            else f"type {tensor.data_type}"
        shown = f"tensor {tensor.name!r} ({kind}, shape {tuple(tensor.dims)})"
        location = info.get("location", "")
        where = Path(location)
        if not location or where.is_absolute() or ".." in where.parts:
            raise InputError(f"ONNX model {path}: {shown} keeps its data at {location!r}, not in a file beside "
                             "the model; re-export it with its data file(s) beside it")
        file = folder / where
        if file not in sizes:
            try:
                found = file.stat()
            except OSError as exc:  # missing, a symlink loop, no permission
                raise InputError(f"cannot read the external weights of ONNX model {path}: {location}: {exc.strerror}; "
                                 "keep the model's data file(s) next to it") from exc
            if not stat.S_ISREG(found.st_mode):  # open() on a FIFO would block, a device never ends
                raise InputError(f"cannot read the external weights of ONNX model {path}: {location} is not a regular "
                                 "file (a folder, pipe, socket or device); keep the model's data file(s) next to it")
            sizes[file] = found.st_size
        size = sizes[file]
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else None
        except ValueError as exc:
            raise InputError(f"ONNX model {path}: {shown} has an external data offset or length that is not a "
                             f"number ({first_line(exc)}); the model is damaged, re-export it") from exc
        needed = _tensor_bytes(tensor)
        read = length if length is not None else size - offset  # without a length, onnx reads to the file's end
        if offset < 0 or read < 0 or offset + read > size:
            span = f"{read} bytes at {offset}..{offset + read}" if length is not None else f"the bytes from {offset} on"
            raise InputError(f"cannot read the external weights of ONNX model {path}: {shown} claims {span} of "
                             f"{location}, which holds {size} bytes; the data file is truncated or does not belong "
                             "to this model, re-export it")
        if needed is not None and read != needed:
            raise InputError(f"cannot read the external weights of ONNX model {path}: {shown} needs {needed} bytes, "
                             f"its external data claims {read} (at {offset} of {location}); the model is damaged, "
                             "re-export it")
        claimed += read
    if claimed > sum(sizes.values()):
        raise InputError(f"cannot read the external weights of ONNX model {path}: its tensors claim {claimed} bytes "
                         f"of external data, their files hold {sum(sizes.values())}; the model is damaged, re-export it")


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor and node name in `graph` and its subgraphs (If/Loop/Scan bodies)."""
    for value in chain(graph.input, graph.output, graph.value_info):
        yield value.name
    for tensor in graph.initializer:
        yield tensor.name
    for sparse in graph.sparse_initializer:
        yield sparse.values.name
        yield sparse.indices.name
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _names(body)


def free_prefix(graph: onnx.GraphProto, base: str) -> str:
    """`base`, or `base` numbered (`reluscope2::`), so that no name in `graph` starts with it: the
    names reluscope adds to a graph then cannot collide with the model's own (a model may name its
    tensors `reluscope::1`)."""
    names = set(_names(graph))
    stem, _, tail = base.partition("::")
    prefix, number = base, 1
    while any(name.startswith(prefix) for name in names):
        number += 1
        prefix = f"{stem}{number}::{tail}"
    return prefix


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
        self._expressions: dict[tuple[str, str], _Expr | None] = {}
        self.atoms: dict[str, _Atom] = {}

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
        bounds = self.clip_bounds(node)
        if bounds is None or bounds[0] != 0:
            return None
        return clamped(bounds[1])

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float | None, float | None] | None:
        """(min, max) of a Clip with constant bounds (None: unbounded); None for a tensor bound."""
        if self.opset < 11:
            attrs = {a.name: a.f for a in node.attribute}
            return attrs.get("min"), attrs.get("max")
        bounds = []
        for index in (1, 2):
            name = node.input[index] if len(node.input) > index else ""
            value = self.scalar(name) if name else None
            if name and value is None:
                return None
            bounds.append(value)
        return bounds[0], bounds[1]

    def ints(self, name: str) -> list[int] | None:
        """The values of a small constant integer tensor (reduction axes), else None."""
        tensor = self.initializers.get(name)
        if tensor is None:
            node = self.op(name, "Constant")
            if node is None or not node.attribute:
                return None
            tensor = onnx.helper.get_attribute_value(node.attribute[0])
            if not isinstance(tensor, onnx.TensorProto):
                return [int(v) for v in np.ravel(tensor)] if np.asarray(tensor).dtype.kind in "iu" else None
        if math.prod(tensor.dims) > 64:
            return None
        value = numpy_helper.to_array(tensor)
        return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else None

    def statistic(self, tensor: str, depth: int = 0) -> bool:
        """Whether `tensor` is a statistic of features rather than features: computed, through per-element and
        shape ops only, from reductions over the unit axis (a decomposed LayerNorm's variance) or from shapes."""
        node = self.producer.get(tensor)
        if node is None or depth > _LAYOUT_DEPTH or node.domain not in _DEFAULT_DOMAINS:
            return False
        if node.op_type in ("Shape", "Size"):
            return True
        if node.op_type in _REDUCTIONS:
            return self._reduces_units(node)
        if node.op_type in _STATISTIC_PROPAGATORS:
            operands = [i for i in node.input if i and not self.is_constant(i)]
            return bool(operands) and all(self.statistic(i, depth + 1) for i in operands)
        return False

    def _reduces_units(self, node: onnx.NodeProto) -> bool:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.ints(node.input[1])
            if axes is None:
                return False  # axes computed at run time: cannot tell
        if not axes:
            return not attrs.get("noop_with_empty_axes", 0)  # every axis: a scalar per sample (or per batch)
        layout = self.layout(node.input[0])
        if layout == CHANNEL:
            return 1 in axes
        if layout == LAST:
            return -1 in axes
        return 1 in axes or -1 in axes

    def expression(self, tensor: str, x: str, depth: int = 0) -> _Expr | None:
        """`tensor` as a sum of terms coefficient * x^power * atoms (Erf, Tanh, Sigmoid, Softplus and hard
        clips of x), read through Add/Sub/Mul/Div/Neg/Pow/Identity; None when it is no such function of x."""
        key = (tensor, x)
        if key in self._expressions:
            return self._expressions[key]
        self._expressions[key] = None  # cycles and deep chains read as "no"
        result = self._expression(tensor, x, depth)
        self._expressions[key] = result
        return result

    def _expression(self, tensor: str, x: str, depth: int) -> _Expr | None:
        if tensor == x:
            return _Expr({(1, ()): 1.0})
        value = self.scalar(tensor)
        if value is not None:
            return _Expr({(0, ()): value})
        node = self.producer.get(tensor)
        if node is None or depth > _EXPRESSION_DEPTH or node.domain not in _DEFAULT_DOMAINS or not node.input:
            return None
        op = node.op_type
        if op in ("Add", "Sub", "Mul") and len(node.input) == 2:
            a, b = (self.expression(i, x, depth + 1) for i in node.input)
            if a is None or b is None:
                return None
            combined = a.plus(b) if op == "Add" else a.plus(b.scaled(-1.0)) if op == "Sub" else a.times(b)
            return combined.using(node) if combined is not None else None
        if op == "Div" and len(node.input) == 2:
            divisor = self.scalar(node.input[1])
            a = self.expression(node.input[0], x, depth + 1)
            return None if a is None or not divisor else a.scaled(1.0 / divisor).using(node)
        if op in ("Neg", "Identity"):
            a = self.expression(node.input[0], x, depth + 1)
            return None if a is None else (a.scaled(-1.0) if op == "Neg" else a).using(node)
        if op == "Pow" and len(node.input) == 2:
            exponent = self.scalar(node.input[1])
            a = self.expression(node.input[0], x, depth + 1)
            if a is None or exponent is None or exponent not in (1.0, 2.0, 3.0, 4.0):
                return None
            result = a
            for _ in range(int(exponent) - 1):
                result = result.times(a)
                if result is None:
                    return None
            return result.using(node)
        atom = self._atom(node, x, depth)
        if atom is None:
            return None
        self.atoms[tensor] = atom
        return _Expr({(0, (tensor,)): 1.0}, atom.argument.nodes | atom.extra_nodes | {node.output[0]})

    def _atom(self, node: onnx.NodeProto, x: str, depth: int) -> _Atom | None:
        op = node.op_type
        if op in ("Erf", "Tanh", "Sigmoid", "Softplus"):
            argument = self.expression(node.input[0], x, depth + 1)
            return None if argument is None else _Atom(op, argument)
        if op == "HardSigmoid":  # clip(alpha * a + beta, 0, 1)
            argument = self.expression(node.input[0], x, depth + 1)
            attrs = {a.name: a.f for a in node.attribute}
            alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
            scaled = None if argument is None else argument.scaled(alpha).plus(_Expr({(0, ()): beta}))
            return None if scaled is None else _Atom("HardClip", scaled, 0.0, 1.0)
        if op == "Relu":
            argument = self.expression(node.input[0], x, depth + 1)
            return None if argument is None else _Atom("HardClip", argument, 0.0, None)
        if op == "Clip":
            bounds = self.clip_bounds(node)
            argument = self.expression(node.input[0], x, depth + 1)
            return None if argument is None or bounds is None else _Atom("HardClip", argument, *bounds)
        if op in ("Max", "Min") and len(node.input) == 2:  # Min(Max(a, 0), 6): relu6(a), as TensorFlow writes it
            for inner, bound in (node.input, reversed(node.input)):
                value = self.scalar(bound)
                if value is None:
                    continue
                argument = self.expression(inner, x, depth + 1)
                if argument is None:
                    return None
                nested = argument.single_atom(self.atoms)
                if nested is not None and nested.op == "HardClip":  # fold Min(Max(.)) into one clip
                    low, high = nested.low, nested.high
                    if op == "Max":
                        low = value if low is None else max(low, value)
                    else:
                        high = value if high is None else min(high, value)
                    return _Atom("HardClip", nested.argument, low, high, argument.nodes)
                return _Atom("HardClip", argument, value, None) if op == "Max" else \
                    _Atom("HardClip", argument, None, value)
        return None

    def composite(self, node: onnx.NodeProto) -> tuple[str, str, frozenset[str]] | None:
        """An activation decomposed into elementwise ops, ending at `node`: (op label, x, ids of its nodes).

        Recognised: x*Sigmoid(x) (SiLU; x*Sigmoid(1.702x) is the sigmoid GELU), x*Tanh(Softplus(x)) (Mish),
        x*HardSigmoid(x), x*Clip(x+3, 0, 6)/6 and x*relu6(x+3)/6 in any order of factors (HardSwish),
        0.5*x*(1+Erf(x/sqrt 2)) and 0.5*x*(1+Tanh(sqrt(2/pi)*(x+0.044715*x^3))) (GELU, exact and tanh)."""
        if node.op_type not in _COMPOSITE_ROOTS or node.domain not in _DEFAULT_DOMAINS or len(node.input) != 2:
            return None
        for x in self._candidates(node):
            expr = self.expression(node.output[0], x)
            if expr is None:
                continue
            label = self._match(expr)
            if label is not None:
                return label, x, expr.nodes
        return None

    def _candidates(self, node: onnx.NodeProto) -> list[str]:
        """Tensors that may be the x of a decomposed activation ending at `node`: those the arithmetic
        ops above it read, nearest first."""
        seen: list[str] = []
        frontier = [node]
        for _ in range(_EXPRESSION_DEPTH):
            following = []
            for current in frontier:
                for name in current.input:
                    if not name or name in seen or self.is_constant(name):
                        continue
                    seen.append(name)
                    producer = self.producer.get(name)
                    if producer is not None and producer.op_type in _ARITHMETIC:
                        following.append(producer)
            if not following or len(seen) > 16:
                break
            frontier = following
        return seen

    def _match(self, expr: _Expr) -> str | None:
        terms = expr.terms
        if len(terms) == 1:
            ((power, atoms), coefficient), = terms.items()
            if power != 1 or len(atoms) != 1:
                return None
            atom = self.atoms[atoms[0]]
            if atom.op == "Sigmoid" and math.isclose(coefficient, 1, rel_tol=_TOL):
                beta = atom.argument.linear()
                if beta is not None and beta[1] == 0:
                    if math.isclose(beta[0], 1, rel_tol=_TOL):
                        return "silu"
                    if math.isclose(beta[0], 1.702, rel_tol=_TOL):
                        return "gelu"
            if atom.op == "Tanh" and math.isclose(coefficient, 1, rel_tol=_TOL):
                inner = atom.argument.single_atom(self.atoms)
                if inner is not None and inner.op == "Softplus" and inner.argument.linear() == (1.0, 0.0):
                    return "mish"
            if atom.op == "HardClip" and _is_hardswish_gate(atom, coefficient):
                return "hardswish"
            return None
        if len(terms) == 2 and math.isclose(terms.get((1, ()), 0.0), 0.5, rel_tol=_TOL):
            (key, coefficient), = ((k, c) for k, c in terms.items() if k != (1, ()))
            if key[0] != 1 or len(key[1]) != 1 or not math.isclose(coefficient, 0.5, rel_tol=_TOL):
                return None
            atom = self.atoms[key[1][0]]
            if atom.op == "Erf":
                linear = atom.argument.linear()
                if linear is not None and linear[1] == 0 and math.isclose(linear[0], 1 / math.sqrt(2), rel_tol=_TOL):
                    return "gelu"
            if atom.op == "Tanh":
                a = math.sqrt(2 / math.pi)
                want = {(1, ()): a, (3, ()): 0.044715 * a}
                got = atom.argument.terms
                if got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=_TOL) for k in want):
                    return "gelu"
        return None


_TOL = 2e-3  # exporters round constants to float32 and to a few digits (0.7071, 1.702, 0.0447)
_EXPRESSION_DEPTH = 12
_MAX_TERMS = 8
_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Identity"})
_COMPOSITE_ROOTS = frozenset({"Add", "Sub", "Mul", "Div"})
_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceL1",
                         "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd"})
_STATISTIC_PROPAGATORS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Cast", "Identity", "Max", "Min", "Clip",
     "Relu", "Unsqueeze", "Squeeze", "Reshape", "Gather", "Slice", "Concat", "Expand"})


@dataclass(frozen=True)
class _Expr:
    """A sum of terms: (power of x, sorted atom tensors) -> coefficient; `nodes`: ids of the nodes read."""

    terms: dict[tuple[int, tuple[str, ...]], float]
    nodes: frozenset[str] = frozenset()

    def using(self, node: onnx.NodeProto) -> _Expr:
        return _Expr(self.terms, self.nodes | {node.output[0]})

    def scaled(self, factor: float) -> _Expr:
        return _Expr({k: c * factor for k, c in self.terms.items()}, self.nodes)

    def plus(self, other: _Expr) -> _Expr | None:
        terms = dict(self.terms)
        for key, coefficient in other.terms.items():
            terms[key] = terms.get(key, 0.0) + coefficient
        terms = {k: c for k, c in terms.items() if c != 0}
        return _Expr(terms, self.nodes | other.nodes) if len(terms) <= _MAX_TERMS else None

    def times(self, other: _Expr) -> _Expr | None:
        terms: dict[tuple[int, tuple[str, ...]], float] = {}
        for (p, a), c in self.terms.items():
            for (q, b), d in other.terms.items():
                key = (p + q, tuple(sorted(a + b)))
                terms[key] = terms.get(key, 0.0) + c * d
        terms = {k: c for k, c in terms.items() if c != 0}
        return _Expr(terms, self.nodes | other.nodes) if len(terms) <= _MAX_TERMS else None

    def linear(self) -> tuple[float, float] | None:
        """(a, b) when this is a*x + b."""
        if not set(self.terms) <= {(1, ()), (0, ())}:
            return None
        return self.terms.get((1, ()), 0.0), self.terms.get((0, ()), 0.0)

    def single_atom(self, atoms: dict[str, _Atom]) -> _Atom | None:
        """The atom when this is exactly 1 * atom."""
        if len(self.terms) != 1:
            return None
        ((power, names), coefficient), = self.terms.items()
        return atoms.get(names[0]) if power == 0 and len(names) == 1 and coefficient == 1 else None


@dataclass(frozen=True)
class _Atom:
    """A nonlinear function of x inside a decomposed activation; HardClip: clip(argument, low, high)."""

    op: str
    argument: _Expr
    low: float | None = None
    high: float | None = None
    extra_nodes: frozenset[str] = frozenset()


def _is_hardswish_gate(atom: _Atom, coefficient: float) -> bool:
    """Whether coefficient * clip(a*x + b, low, high) is hardswish's gate clip(x/6 + 1/2, 0, 1)."""
    linear = atom.argument.linear()
    if linear is None or atom.low is None or atom.high is None or linear[0] <= 0 or coefficient <= 0:
        return False
    a, b = linear
    close = partial(math.isclose, rel_tol=_TOL, abs_tol=1e-6)
    return (close(coefficient * atom.low, 0.0) and close(coefficient * atom.high, 1.0)
            and close(-3 * a + b, atom.low) and close(3 * a + b, atom.high))


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
    found = _classify_op(node, graph)
    if found is not None and graph.statistic(found[1]):
        return None  # Max(var, 0) inside a decomposed LayerNorm: a clamp of a statistic, not of features
    return found


def _classify_op(node: onnx.NodeProto, graph: _Graph) -> tuple[Activation, str] | None:
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
    composite = graph.composite(node)
    return (activation(composite[0]), composite[1]) if composite is not None else None


def _parts(graph_proto: onnx.GraphProto, graph: _Graph) -> dict[str, frozenset[str]]:
    """Decomposed activations: root output tensor -> output tensors of the nodes inside it, which are part
    of that site and not sites themselves (the Clip of x*Clip(x+3, 0, 6)/6 is no relu6)."""
    parts = {}
    for node in graph_proto.node:
        if node.op_type in _COMPOSITE_ROOTS and (found := graph.composite(node)) is not None:
            parts[node.output[0]] = found[2] - {node.output[0]}
    return parts


def _sites_of(graph_proto: onnx.GraphProto, opset: int) -> Iterator[tuple[onnx.NodeProto, Activation, str, _Graph]]:
    graph = _Graph(graph_proto, opset)
    parts = _parts(graph_proto, graph)
    inside = frozenset().union(*parts.values()) if parts else frozenset()
    for node in graph_proto.node:
        if node.output and node.output[0] in inside:
            continue
        found = _classify(node, graph)
        if found is not None:
            yield node, found[0], found[1], graph


def _site_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


_LOOP_REASON = ("inside the {attr} subgraph of {op} node {node!r}; onnxruntime returns no tensors from inside a "
                "loop body")
_NEVER_RAN = "inside {branch}, which never ran on the calibration data"


def _control_flow_sites(graph_proto: onnx.GraphProto, opset: int, reason: str | None = None) -> Iterator[dict[str, Any]]:
    """Sites inside the bodies of `graph_proto`'s nodes (at any depth) that cannot be exposed, with the reason:
    everything inside Loop/Scan bodies; the If branches themselves are exposed (see expose_branches)."""
    for node in graph_proto.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                if reason is None and node.op_type == "If" and node.domain in _DEFAULT_DOMAINS:
                    yield from _control_flow_sites(body, opset)  # exposed; Loops inside it are not
                    continue
                why = reason or _LOOP_REASON.format(attr=attr.name, op=node.op_type, node=_site_name(node))
                for inner, act, _, _ in _sites_of(body, opset):
                    yield {"name": _site_name(inner), "op": act.op, "reason": why}
                yield from _control_flow_sites(body, opset, why)


def inline_constant_ifs(graph: onnx.GraphProto, opset: int) -> None:
    """Replace each If of `graph` whose condition is a constant by the nodes of the branch it takes (their
    sites are then plain sites). An If whose branch defines a name the graph already has stays."""
    while True:
        lookup = _Graph(graph, opset)
        for index, node in enumerate(graph.node):
            if node.op_type != "If" or node.domain not in _DEFAULT_DOMAINS:
                continue
            condition = lookup.scalar(node.input[0])
            if condition is None:
                continue
            attr = "then_branch" if condition else "else_branch"
            body = next(a.g for a in node.attribute if a.name == attr)
            defined = {out for n in body.node for out in n.output if out} | {i.name for i in body.initializer}
            taken = {out for n in graph.node for out in n.output} | {v.name for v in graph.input} | set(
                lookup.initializers)
            if defined & taken:
                continue
            nodes = [helper_constant(init) for init in body.initializer] + list(body.node) + [
                onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{_site_name(node)}/{attr}/{outer}")
                for inner, outer in zip(body.output, node.output)]
            graph.value_info.extend(body.value_info)
            rest = list(graph.node)
            rest[index:index + 1] = nodes
            del graph.node[:]
            graph.node.extend(rest)
            break
        else:
            return


def helper_constant(tensor: onnx.TensorProto) -> onnx.NodeProto:
    return onnx.helper.make_node("Constant", [], [tensor.name], value=tensor)


class _Exposer:
    """Makes the sites inside If branches visible: each site tensor becomes an output of its branch (the other
    branch gives an empty tensor in its place) and of the If node, up to the main graph."""

    def __init__(self, opset: int, types: dict[str, int], prefix: str = "reluscope::") -> None:
        self.opset = opset
        self.types = types  # elem types of tensors, from shape inference
        self.count = 0
        self.prefix = prefix  # that no name of the graph starts with (see free_prefix)

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{self.prefix}{kind}{self.count}"

    def expose(self, graph: onnx.GraphProto) -> list[tuple[int, OnnxSite]]:
        """(index of the node in `graph` holding it, site) for the sites inside `graph`'s If nodes; their
        `output`/`output_input` name tensors of `graph`'s scope."""
        found = []
        for index, node in enumerate(list(graph.node)):
            if node.op_type != "If" or node.domain not in _DEFAULT_DOMAINS:
                continue
            for site in self._expose_if(node):
                found.append((index, site))
        return found

    def _expose_if(self, node: onnx.NodeProto) -> list[OnnxSite]:
        branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
        if len(branches) != 2:
            return []
        exposed = []
        for attr, body in branches.items():
            where = f"the {attr} of If node {_site_name(node)!r}"
            sites = [OnnxSite(_site_name(n), n.output[0], inp, act, _layout_of(n, inp, g), node=_site_name(n),
                              branch=where) for n, act, inp, g in _sites_of(body, self.opset)]
            nested = [site for _, site in self.expose(body)]
            for site in sites + nested:
                names = [site.fetch] + ([site.fetch_input] if site.activation.active_from_input else [])
                outer = [self._add_output(node, branches, attr, name) for name in names]
                exposed.append(replace(site, output=outer[0], output_input=outer[1] if len(outer) > 1 else None))
        return exposed

    def _add_output(self, node: onnx.NodeProto, branches: dict[str, onnx.GraphProto], attr: str, name: str) -> str:
        elem = self.types.get(name, onnx.TensorProto.FLOAT)
        inner = self._name("exposed")
        for key, body in branches.items():
            if key == attr:
                body.node.append(onnx.helper.make_node("Identity", [name], [inner], name=inner))
                body.output.append(onnx.helper.make_tensor_value_info(inner, elem, None))
            else:  # the branch that did not compute it: an empty tensor, read as "did not run"
                empty = self._name("empty")
                value = np.zeros((0,), dtype=onnx.helper.tensor_dtype_to_np_dtype(elem))
                body.node.append(onnx.helper.make_node("Constant", [], [empty], name=empty,
                                                       value=numpy_helper.from_array(value)))
                body.output.append(onnx.helper.make_tensor_value_info(empty, elem, None))
        outer = self._name("branch")
        node.output.append(outer)
        return outer


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` with onnx's shape inference applied, on a copy without its large weights' values (inference
    needs their shapes only); None where inference fails (custom ops, odd graphs)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor in skeleton.graph.initializer:
        if math.prod(tensor.dims) > 1024:
            tensor.ClearField("raw_data")
    try:
        return onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # noqa: BLE001 - onnx raises several types for graphs it cannot infer
        return None


def _subgraph_types(model: onnx.ModelProto) -> dict[str, int]:
    """Elem types of the tensors inside subgraphs, from shape inference (none known where it fails: the
    default, float, then)."""
    inferred = infer_shapes(model)
    if inferred is None:
        return {}
    types: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for value in chain(graph.input, graph.value_info, graph.output):
            if value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
        for node in graph.node:
            for attr in node.attribute:
                for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk(body)

    walk(inferred.graph)
    return types


def find_sites(model: onnx.ModelProto) -> tuple[list[OnnxSite], list[dict[str, Any]]]:
    """Sites of the main graph in graph (execution) order, and the sites it cannot expose.

    Changes `model`: If nodes with a constant condition are replaced by the branch they take, and the
    sites inside other If nodes' branches become outputs of those nodes (OnnxSite.output)."""
    opset = default_opset(model)
    inline_constant_ifs(model.graph, opset)
    has_ifs = any(node.op_type == "If" for node in model.graph.node)
    branch_sites = _Exposer(opset, _subgraph_types(model) if has_ifs else {},
                            free_prefix(model.graph, "reluscope::")).expose(model.graph) if has_ifs else []
    found = list(_sites_of(model.graph, opset))
    index = {id_: position for position, id_ in enumerate(node.output[0] if node.output else "" for node in
                                                             model.graph.node)}
    ordered = sorted([(index.get(node.output[0], 0), 0, (node, act, inp, graph)) for node, act, inp, graph in found]
                     + [(position, 1, site) for position, site in branch_sites], key=lambda item: item[:2])
    nodes_for_names = [(entry[2][0], entry[2][1], _parts_of(entry[2][0], entry[2][3])) if entry[1] == 0
                       else (None, entry[2].activation, frozenset()) for entry in ordered]
    modules = torch_site_names(nodes_for_names, _scopes(model.graph))
    sites = []
    for (_, kind, entry), module in zip(ordered, modules):
        if kind == 0:
            node, act, inp, graph = entry
            sites.append(OnnxSite(module or _site_name(node), node.output[0], inp, act, _layout_of(node, inp, graph),
                                  module, node=_site_name(node)))
        else:
            sites.append(entry)
    blocked = [{"name": _site_name(node), "op": act.op, "reason": _NCHWC_REASON} for node in model.graph.node
               if node.domain == _NCHWC_DOMAIN and (act := _fused_activation(node)) is not None]
    return sites, blocked + list(_control_flow_sites(model.graph, opset))


def _parts_of(node: onnx.NodeProto, graph: _Graph) -> frozenset[str]:
    composite = graph.composite(node) if node.op_type in _COMPOSITE_ROOTS else None
    return composite[2] if composite is not None else frozenset({node.output[0]})


def _layout_of(node: onnx.NodeProto, inp: str, graph: _Graph) -> str | None:
    """Where a site's units lie: a fused layer knows; otherwise the layer that produced its input."""
    if node.domain == "com.microsoft" and node.op_type in _FUSED_LAYERS:
        return _FUSED_LAYERS[node.op_type]
    return graph.layout(inp)


@dataclass
class _Scopes:
    """Module scopes of the TorchScript exporter's node names (`/features/features.2/Relu`)."""

    direct: dict[tuple[str, ...], set[str]]  # scope -> outputs of the (non-Constant) nodes directly in it
    parents: set[tuple[str, ...]]  # scopes with deeper scopes in them


def _scopes(graph: onnx.GraphProto) -> _Scopes:
    scopes = _Scopes({}, set())
    for node in graph.node:
        if not node.name.startswith("/") or not node.output:
            continue
        path = tuple(node.name[1:].split("/")[:-1])
        if node.op_type != "Constant":
            scopes.direct.setdefault(path, set()).add(node.output[0])
        for cut in range(len(path)):
            scopes.parents.add(path[:cut])
        scopes.direct.setdefault(path, set())
    return scopes


def _qualname(path: tuple[str, ...], scopes: _Scopes) -> str:
    """`('layer1', 'layer1.0', 'conv1')` -> `layer1.0.conv1`; a module's k-th repeated call (`relu_1`, when its
    parent also holds `relu`) -> the module's name."""
    parts: list[str] = []
    previous = ""
    for depth, component in enumerate(path):
        relative = component[len(previous) + 1:] if previous and component.startswith(previous + ".") else component
        repeat = re.fullmatch(r"(.+)_\d+", relative)
        if repeat and path[:depth] + (component[:len(component) - len(relative)] + repeat[1],) in scopes.direct:
            relative = repeat[1]
        parts.append(relative)
        previous = component
    return ".".join(parts)


def _torchscript_base(node: onnx.NodeProto, op: str, parts: frozenset[str], scopes: _Scopes) -> str | None:
    """The PyTorch site name from a TorchScript-exporter node name: the module itself when the scope holds
    nothing but this activation and no submodule (an nn.ReLU), else a functional call made in the scope."""
    if not node.name.startswith("/"):
        return None
    path = tuple(node.name[1:].split("/")[:-1])
    if not path:
        return functional_site_name("", op)
    qualname = _qualname(path, scopes)
    if path not in scopes.parents and scopes.direct.get(path, set()) <= parts | {node.output[0]}:
        return qualname
    return functional_site_name(qualname, op)


def torch_site_names(nodes: list[tuple[onnx.NodeProto | None, Activation, frozenset[str]]],
                     scopes: _Scopes | None = None) -> list[str | None]:
    """What the PyTorch path would call each site: from the dynamo exporter's per-node metadata
    (`pkg.torch.onnx.name_scopes`: module qualnames, `...class_hierarchy`: their classes), so that
    `node_relu_2` can be traced back to `features.3`, or from the TorchScript exporter's scoped node
    names (`/features/features.3/Relu`). None where neither is there (or no node: a site in a branch).
    The exporter may fold sites away (relu(relu(x)) becomes one Relu), so names, not positions,
    are what relate the two reports. `nodes`: (node, activation, outputs of the nodes the site spans)."""
    import ast

    from ...measure.sites import is_activation_module

    bases: list[str | None] = []
    for node, act, parts in nodes:
        if node is None:
            bases.append(None)
            continue
        props = {p.key: p.value for p in node.metadata_props}
        try:
            names = ast.literal_eval(props["pkg.torch.onnx.name_scopes"])
            classes = ast.literal_eval(props["pkg.torch.onnx.class_hierarchy"])
        except (KeyError, ValueError, SyntaxError):
            bases.append(_torchscript_base(node, act.op, parts, scopes) if scopes is not None else None)
            continue
        path = names[-2] if len(names) >= 3 else ""  # [root "", module qualnames..., the aten node]
        owner = classes[-2] if len(classes) >= 2 else ""
        bases.append(path if path and is_activation_module(owner) else functional_site_name(path, act.op))
    return call_names(bases)
