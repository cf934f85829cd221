"""Channel spaces of an ONNX graph, for `reluscope prune`: which tensors share a unit axis with an
activation site, and which constants a unit's removal slices.

One pass over the nodes (ONNX graphs are topologically sorted) gives every traced tensor its
*segments*: which space each stretch of its channel axis belongs to. A layer that writes new
channels (Conv, Gemm, MatMul with a constant weight) starts a space; per-channel and
pass-through ops hand their input's segments on; a residual Add joins two spaces into one; a
Concat lays its inputs' segments side by side; a flatten to N x (C*H*W) spreads each channel
over H*W features (a segment's `stride`). Any other use of a traced tensor blocks its spaces,
with a reason that names the op and node: removing a unit there would change what that op sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

_DEFAULT_DOMAINS = ("", "ai.onnx")

# Per-element ops whose output has their first input's channels (extra outputs, such as Dropout's mask
# or MaxPool's indices, too). A removed unit's values at their outputs are measured, never assumed.
_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                          "Softplus", "Softsign", "Gelu", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Dropout",
                          "Identity", "Cast", "ThresholdedRelu", "Floor", "Ceil", "Round", "Reciprocal", "Sign"})
# Pooling keeps the channel axis (1) and works on each channel alone.
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
# Reductions over the spatial axes only (AdaptiveAvgPool2d(1) and x.mean((2, 3)) export to ReduceMean) keep
# each channel to itself, like a global pool.
_REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
                      "ReduceProd", "ReduceSumSquare", "ReduceLogSum"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
_RESIDUAL = frozenset({"Add", "Sub", "Mul"})  # two computed operands that may join their spaces


@dataclass(frozen=True)
class Segment:
    """A stretch of a tensor's channel axis that belongs to one space: the space's unit k covers the
    features start + k*stride .. start + (k+1)*stride - 1."""

    space: int
    start: int
    width: int  # units of the space
    stride: int = 1  # features per unit: H*W on a flattened NCHW tensor


@dataclass(frozen=True)
class Cut:
    """A constant input (node index, input index) sliced along `axis` when its space loses units."""

    node: int
    input: int
    axis: int  # negative: counted from the constant's last axis
    start: int
    stride: int = 1


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the space on its input features: what a removed unit fed it is folded into its bias."""

    node: int
    kind: str  # "conv", "gemm" or "matmul"
    tensor: str  # the input it reads the space from
    start: int
    stride: int


@dataclass(frozen=True)
class Producer:
    """A layer writing the space's channels: its weight is a Cut; its bias (which folds may create or widen)
    is sliced by its output's segments after the folds."""

    node: int
    bias_input: int | None  # Conv/Gemm: 2; MatMul: None (a following Add holds its bias)
    output: str


@dataclass
class Space:
    width: int
    cuts: list[Cut] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    depthwise: list[int] = field(default_factory=list)  # Conv nodes whose `group` follows their channel count
    reshapes: list[tuple[int, int]] = field(default_factory=list)  # (Reshape node, features per unit)
    blocked: list[str] = field(default_factory=list)


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


class ChannelGraph:
    """The spaces of `model`'s main graph. `shapes`: tensor name -> dims (None where unknown), from shape
    inference; constants are read from initializers (`constants`: name -> dims)."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> None:
        self.graph = model.graph
        self.shapes = shapes
        self.constants = {init.name: list(init.dims) for init in model.graph.initializer}
        self.segments: dict[str, list[Segment]] = {}
        self.axis: dict[str, int] = {}  # traced tensor -> its channel axis (non-negative)
        self.spaces: list[Space] = []
        self._parent: list[int] = []
        self.uses: dict[str, list[tuple[int, int]]] = {}  # tensor -> (node, input index) reading it
        for index, node in enumerate(self.graph.node):
            for position, name in enumerate(node.input):
                if name:
                    self.uses.setdefault(name, []).append((index, position))
        for index, node in enumerate(self.graph.node):
            self._visit(index, node)
        for value in self.graph.output:
            self._block(value.name, f"reaches the graph output {value.name!r}")

    # spaces --------------------------------------------------------------
    def find(self, space: int) -> int:
        while self._parent[space] != space:
            self._parent[space] = self._parent[self._parent[space]]
            space = self._parent[space]
        return space

    def space(self, space: int) -> Space:
        return self.spaces[self.find(space)]

    def roots(self) -> list[int]:
        return [index for index in range(len(self.spaces)) if self.find(index) == index]

    def _new_space(self, width: int) -> int:
        self.spaces.append(Space(width))
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def _join(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        kept, gone = self.spaces[a], self.spaces[b]
        for name in ("cuts", "consumers", "producers", "depthwise", "reshapes", "blocked"):
            getattr(kept, name).extend(getattr(gone, name))
        self._parent[b] = a

    def _block(self, tensor: str, reason: str) -> None:
        for segment in self.segments.get(tensor, []):
            blocked = self.space(segment.space).blocked
            if reason not in blocked:
                blocked.append(reason)

    def _pass(self, node: onnx.NodeProto, source: str) -> None:
        """`node`'s outputs carry `source`'s channels."""
        for out in node.output:
            if out:
                self.segments[out] = self.segments[source]
                self.axis[out] = self.axis[source]

    # helpers -------------------------------------------------------------
    def rank(self, tensor: str) -> int | None:
        dims = self.shapes.get(tensor)
        return None if dims is None else len(dims)

    def features(self, tensor: str) -> int:
        return sum(segment.width * segment.stride for segment in self.segments[tensor])

    def _single_use(self, name: str) -> bool:
        return len({node for node, _ in self.uses.get(name, [])}) == 1

    def _unsupported(self, node: onnx.NodeProto, why: str = ", which reluscope cannot prune through") -> None:
        for name in node.input:
            if name in self.segments:
                self._block(name, f"reaches {describe(node)}{why}")

    # the pass ------------------------------------------------------------
    def _visit(self, index: int, node: onnx.NodeProto) -> None:
        traced = [name for name in node.input if name in self.segments]
        if node.domain not in _DEFAULT_DOMAINS:
            self._unsupported(node)
            return
        op = node.op_type
        if op == "Conv":
            self._conv(index, node)
        elif op == "Gemm":
            self._gemm(index, node)
        elif op == "MatMul":
            self._matmul(index, node)
        elif not traced:
            return
        elif op in _ELEMENTWISE or op == "Clip":
            self._elementwise(node)
        elif op in _POOLS:
            self._pool(node)
        elif op in _REDUCES:
            self._reduce(node)
        elif op == "BatchNormalization":
            self._batch_norm(index, node)
        elif op in _BINARY or op == "PRelu":
            self._binary(index, node)
        elif op == "Concat":
            self._concat(node)
        elif op in ("Flatten", "Reshape"):
            self._flatten(index, node)
        else:
            self._unsupported(node)

    def _start(self, index: int, node: onnx.NodeProto, width: int, axis: int | None,
               weight_axis: int, bias_input: int | None) -> None:
        """`node` writes a new space of `width` channels on `axis` of its output."""
        out = node.output[0]
        space = self._new_space(width)
        self.segments[out] = [Segment(space, 0, width)]
        self.axis[out] = axis if axis is not None else 0
        record = self.spaces[space]
        if axis is None:
            record.blocked.append(f"the channel axis of {describe(node)}'s output cannot be determined")
        record.cuts.append(Cut(index, 1, weight_axis, 0))
        record.producers.append(Producer(index, bias_input, out))
        for position in [1] + ([bias_input] if bias_input is not None and len(node.input) > bias_input
                               and node.input[bias_input] else []):
            name = node.input[position]
            if name not in self.constants:
                record.blocked.append(f"{describe(node)} has a computed weight or bias {name!r}")

    def _consume(self, index: int, node: onnx.NodeProto, kind: str, tensor: str, weight_axis: int) -> None:
        for segment in self.segments[tensor]:
            space = self.space(segment.space)
            space.consumers.append(Consumer(index, kind, tensor, segment.start, segment.stride))
            space.cuts.append(Cut(index, 1, weight_axis, segment.start, segment.stride))

    def _conv(self, index: int, node: onnx.NodeProto) -> None:
        x, weight = node.input[0], node.input[1]
        dims = self.constants.get(weight)
        group = int(attribute(node, "group", 1))
        if dims is None or len(dims) < 3:
            self._unsupported(node, " whose weight is not a constant")
            return
        out_channels, per_group = dims[0], dims[1]
        if group > 1 and per_group == 1 and out_channels == group:  # depthwise: in and out channels coupled
            if x not in self.segments:
                return
            if self.axis[x] != 1 or any(s.stride != 1 for s in self.segments[x]):
                self._unsupported(node, " across a non-channel axis")
                return
            self._pass(node, x)
            has_bias = len(node.input) > 2 and node.input[2]
            for segment in self.segments[x]:
                space = self.space(segment.space)
                space.cuts.append(Cut(index, 1, 0, segment.start))
                if has_bias:
                    space.cuts.append(Cut(index, 2, 0, segment.start))
                if index not in space.depthwise:
                    space.depthwise.append(index)
            return
        if x in self.segments:
            if group != 1:
                self._unsupported(node, f" (grouped, group={group}), which reluscope cannot prune through")
            elif self.axis[x] != 1 or any(s.stride != 1 for s in self.segments[x]):
                self._unsupported(node, " across a non-channel axis")
            else:
                self._consume(index, node, "conv", x, 1)
        if group == 1:
            self._start(index, node, out_channels, 1, 0, 2)

    def _gemm(self, index: int, node: onnx.NodeProto) -> None:
        a, b = node.input[0], node.input[1]
        dims = self.constants.get(b)
        trans_b = int(attribute(node, "transB", 0))
        if a in self.segments:
            if int(attribute(node, "transA", 0)) or dims is None or self.axis[a] != 1:
                self._unsupported(node, " (transposed input or computed weight), which reluscope cannot prune through")
            else:
                self._consume(index, node, "gemm", a, 1 if trans_b else 0)
        if b in self.segments:
            self._unsupported(node)
        if dims is not None and len(dims) == 2:
            self._start(index, node, dims[0] if trans_b else dims[1], 1, 0 if trans_b else 1, 2)

    def _matmul(self, index: int, node: onnx.NodeProto) -> None:
        a, b = node.input[0], node.input[1]
        dims = self.constants.get(b)
        if b in self.segments:
            self._unsupported(node, " as its right operand, which reluscope cannot prune through")
        if a in self.segments:
            rank = self.rank(a)
            if dims is None or len(dims) != 2 or rank is None or self.axis[a] != rank - 1:
                self._unsupported(node, " (computed weight or not on its last axis), which reluscope cannot "
                                        "prune through")
            else:
                self._consume(index, node, "matmul", a, 0)
        if dims is not None and len(dims) == 2:
            rank = self.rank(node.output[0])
            self._start(index, node, dims[1], None if rank is None else rank - 1, 1, None)

    def _elementwise(self, node: onnx.NodeProto) -> None:
        x = node.input[0]
        if any(name in self.segments or (name and math.prod(self.constants.get(name, [2])) != 1)
               for name in node.input[1:]):  # Clip's bounds: constant scalars only
            self._unsupported(node, " with bounds that are not constant scalars")
            return
        self._pass(node, x)

    def _pool(self, node: onnx.NodeProto) -> None:
        x = node.input[0]
        if self.axis[x] != 1 or any(s.stride != 1 for s in self.segments[x]):
            self._unsupported(node, " across a non-channel axis")
            return
        self._pass(node, x)

    def _reduce(self, node: onnx.NodeProto) -> None:
        """A reduction over spatial axes of an NCHW tensor: the channels stay on axis 1 (kept dims or not)."""
        x = node.input[0]
        rank = self.rank(x)
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._shape_constant(node.input[1])
        spatial = rank is not None and axes is not None and len(axes) > 0 and \
            all(2 <= (int(a) % rank) for a in axes)
        if not spatial or self.axis[x] != 1 or any(s.stride != 1 for s in self.segments[x]):
            self._unsupported(node, " over the channel axis (or over axes reluscope cannot tell)")
            return
        self._pass(node, x)

    def _batch_norm(self, index: int, node: onnx.NodeProto) -> None:
        x = node.input[0]
        if x not in self.segments or any(name in self.segments for name in node.input[1:]) or \
                len([o for o in node.output if o]) > 1 or self.axis[x] != 1 or \
                any(s.stride != 1 for s in self.segments[x]):
            self._unsupported(node, " in training mode or across a non-channel axis")
            return
        # scale, B, mean and var are vectors over the channels (not broadcast against x as Add's operand is)
        if any(self.constants.get(name) != [self.features(x)] for name in node.input[1:5]):
            self._unsupported(node, " with statistics that are not constants, one per channel")
            return
        for position in range(1, 5):
            for segment in self.segments[x]:
                self.space(segment.space).cuts.append(Cut(index, position, 0, segment.start))
        self._pass(node, x)

    def _per_channel(self, index: int, node: onnx.NodeProto, x: str, position: int) -> bool:
        """Slice constant input `position` of `node` with `x`'s channels where it is per channel; False
        (and `x`'s spaces blocked) where it is neither per channel nor broadcast along the channels."""
        name = node.input[position]
        dims = self.constants.get(name)
        rank = self.rank(x)
        if dims is None or rank is None or len(dims) > rank:
            self._unsupported(node, f" with an operand {name!r} reluscope cannot slice per channel")
            return False
        position_in_constant = self.axis[x] - (rank - len(dims))
        if position_in_constant < 0 or dims[position_in_constant] == 1:
            return True  # broadcast along the channels: nothing to slice
        if dims[position_in_constant] != self.features(x):
            self._unsupported(node, f" with an operand {name!r} reluscope cannot slice per channel")
            return False
        for segment in self.segments[x]:
            self.space(segment.space).cuts.append(
                Cut(index, position, position_in_constant - len(dims), segment.start, segment.stride))
        return True

    def _binary(self, index: int, node: onnx.NodeProto) -> None:
        if len(node.input) != 2:
            self._unsupported(node)
            return
        a, b = node.input
        constant = [name in self.constants for name in (a, b)]
        if node.op_type == "PRelu" and not constant[1]:
            self._unsupported(node, " with a computed slope")
            return
        if any(constant):
            x, position = (b, 1) if constant[0] else (a, 0)
            if x in self.segments and self._per_channel(index, node, x, 1 - position):
                self._pass(node, x)
            return
        traced = [name for name in (a, b) if name in self.segments]
        if node.op_type not in _RESIDUAL or len(traced) != 2:
            self._unsupported(node, " together with a tensor reluscope cannot trace" if node.op_type in _RESIDUAL
                              else ", which reluscope cannot prune through")
            return
        left, right = self.segments[a], self.segments[b]
        layout = lambda segments: [(s.start, s.width, s.stride) for s in segments]  # noqa: E731
        if layout(left) != layout(right) or self.rank(a) != self.rank(b) or self.axis[a] != self.axis[b]:
            self._unsupported(node, " joining tensors whose channels do not line up")
            return
        for one, other in zip(left, right):
            self._join(one.space, other.space)
        self._pass(node, a)

    def _concat(self, node: onnx.NodeProto) -> None:
        inputs = [name for name in node.input if name]
        rank = self.rank(inputs[0])
        axis = int(attribute(node, "axis", 1))
        axis = axis + rank if rank is not None and axis < 0 else axis
        if not all(name in self.segments and self.axis[name] == axis for name in inputs):
            self._unsupported(node, " along another axis, or with an input reluscope cannot trace")
            return
        segments, offset = [], 0
        for name in inputs:
            segments.extend(Segment(s.space, s.start + offset, s.width, s.stride) for s in self.segments[name])
            offset += self.features(name)
        self.segments[node.output[0]] = segments
        self.axis[node.output[0]] = axis

    def _flatten(self, index: int, node: onnx.NodeProto) -> None:
        """Flatten(axis=1), or a Reshape to (N, C*H*W), of an NCHW tensor: channel c becomes features
        c*H*W .. (c+1)*H*W-1."""
        x = node.input[0]
        if x not in self.segments:
            self._unsupported(node)
            return
        dims = self.shapes.get(x)
        spatial = dims[2:] if dims is not None else None
        flat = spatial is not None and all(isinstance(d, int) and d > 0 for d in spatial) and self.axis[x] == 1 \
            and all(s.stride == 1 for s in self.segments[x])
        hard_coded = False
        if flat and node.op_type == "Flatten":
            flat = int(attribute(node, "axis", 1)) == 1
        elif flat:
            target = self._shape_constant(node.input[1])
            features = self.features(x) * math.prod(spatial)
            flat = target is not None and len(target) == 2 and target[1] in (-1, features) and \
                target[0] != 0 and (target[0] != -1 or target[1] != -1) and self._single_use(node.input[1])
            hard_coded = flat and target[1] == features
        if not flat:
            self._unsupported(node, " to a shape other than (N, C*H*W), which reluscope cannot prune through")
            return
        area = math.prod(spatial)
        out = node.output[0]
        self.segments[out] = [Segment(s.space, s.start * area, s.width, area) for s in self.segments[x]]
        self.axis[out] = 1
        if hard_coded:
            for segment in self.segments[x]:
                space = self.space(segment.space)
                if (index, area) not in space.reshapes:
                    space.reshapes.append((index, area))

    def _shape_constant(self, name: str) -> list[int] | None:
        init = next((i for i in self.graph.initializer if i.name == name), None)
        if init is None or len(init.dims) != 1 or init.dims[0] > 8:
            return None
        return [int(v) for v in numpy_helper.to_array(init)]
