"""Removing units from a copy of an ONNX graph: fold what each removed unit fed its consumers into
their biases, then slice every constant of the units' spaces and update what follows the channel
counts (a depthwise Conv's `group`, a flattening Reshape's feature count).

Folds run before any slice, on the original constants, so that every index is the original
model's. A constant that several inputs read is sliced once when they all want the same result;
otherwise each input that changes gets its own copy, so no other reader sees a change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .channels import ChannelGraph, Consumer, attribute
from .graph import free_prefix

Use = tuple[int, int]  # (node index, input index)


@dataclass(frozen=True)
class Fold:
    """Consumer `consumer` read the constant(s) `values` (one per feature of the unit) at space unit `unit`."""

    consumer: Consumer
    unit: int
    values: np.ndarray


class RemovalError(Exception):
    """The graph cannot be changed as asked (a reason for the units to stay)."""


def unit_features(start: int, stride: int, units: list[int]) -> list[int]:
    """Indices along a constant's (or tensor's) axis that units of a segment cover."""
    return [start + unit * stride + offset for unit in units for offset in range(stride)]


def matmul_bias(graph: onnx.GraphProto, channels: ChannelGraph, node: int) -> Use | None:
    """The Add of a constant per-feature bias that alone reads a MatMul's output, as (node, input)."""
    uses = channels.uses.get(graph.node[node].output[0], [])
    if len(uses) != 1 or graph.node[uses[0][0]].op_type != "Add":
        return None
    add, position = uses[0]
    other = graph.node[add].input[1 - position]
    dims = channels.constants.get(other)
    width = channels.constants[graph.node[node].input[1]][1]
    if dims is None or not dims or dims[-1] != width or any(d != 1 for d in dims[:-1]):
        return None
    return add, 1 - position


class _Edit:
    def __init__(self, model: onnx.ModelProto, channels: ChannelGraph) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.channels = channels
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.values: dict[Use, np.ndarray] = {}  # inputs whose constant changes, by their new value
        self.created: set[Use] = set()  # biases that did not exist
        self.drops: dict[Use, dict[int, set[int]]] = {}  # input -> axis -> indices to delete
        self.inserted: dict[int, np.ndarray] = {}  # MatMul node -> bias of an Add to put after it
        self.prefix = free_prefix(self.graph, "reluscope::")
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}{base}.{self.count}"

    def current(self, use: Use) -> np.ndarray:
        if use not in self.values:
            name = self.graph.node[use[0]].input[use[1]]
            self.values[use] = numpy_helper.to_array(self.initializers[name]).copy()
        return self.values[use]

    def add_to(self, use: Use, delta: np.ndarray) -> None:
        node = self.graph.node[use[0]]
        if use in self.values or (len(node.input) > use[1] and node.input[use[1]]):
            self.values[use] = self.current(use) + delta.astype(self.current(use).dtype)
        else:
            self.values[use] = delta
            self.created.add(use)

    # folds ----------------------------------------------------------------
    def fold(self, fold: Fold) -> None:
        consumer = fold.consumer
        node = self.graph.node[consumer.node]
        weight = self.current((consumer.node, 1))
        features = unit_features(consumer.start, consumer.stride, [fold.unit])
        values = fold.values.astype(np.float64)
        if consumer.kind == "conv":  # the unit's input channel, constant over every position
            delta = weight[:, features[0]].reshape(weight.shape[0], -1).sum(axis=1) * values[0]
            self.add_to((consumer.node, 2), delta.astype(weight.dtype))
        elif consumer.kind == "gemm":
            rows = weight.T if attribute(node, "transB", 0) else weight  # [in, out]
            delta = float(attribute(node, "alpha", 1.0)) * (values @ rows[features].astype(np.float64))
            beta = float(attribute(node, "beta", 1.0))
            if beta != 1.0:  # Y = alpha*A*B + beta*C: carry beta into C once, then C takes the fold as it is
                if (consumer.node, 2) in self.values or (len(node.input) > 2 and node.input[2]):
                    self.values[(consumer.node, 2)] = self.current((consumer.node, 2)) * beta
                for attr in node.attribute:
                    if attr.name == "beta":
                        attr.f = 1.0
            self.add_to((consumer.node, 2), delta.astype(weight.dtype))
        else:  # matmul: into the bias Add after it, or one put there
            delta = (values @ weight[features].astype(np.float64)).astype(weight.dtype)
            bias = matmul_bias(self.graph, self.channels, consumer.node)
            if bias is not None:
                self.add_to(bias, delta)
            else:
                self.inserted[consumer.node] = self.inserted.get(consumer.node, 0) + delta

    # slices ---------------------------------------------------------------
    def drop(self, use: Use, axis: int, indices: list[int]) -> None:
        self.drops.setdefault(use, {}).setdefault(axis, set()).update(indices)

    def output_units(self, tensor: str, removal: dict[int, list[int]]) -> list[int]:
        """Indices of `tensor`'s channel axis that `removal` (space root -> units) removes."""
        return sorted(index for segment in self.channels.segments.get(tensor, [])
                      for index in unit_features(segment.start, segment.stride,
                                                 removal.get(self.channels.find(segment.space), [])))

    def sliced(self, use: Use) -> np.ndarray:
        value = self.current(use)
        for axis, indices in self.drops.get(use, {}).items():
            value = np.delete(value, sorted(indices), axis=axis)
        return value

    # writing ----------------------------------------------------------------
    def write(self) -> None:
        graph = self.graph
        by_name: dict[str, list[Use]] = {}
        for use in set(self.values) | set(self.drops):
            if use in self.created:
                continue
            by_name.setdefault(graph.node[use[0]].input[use[1]], []).append(use)
        for name, uses in by_name.items():
            results = {use: self.sliced(use) for use in uses}
            readers = set(self.channels.uses.get(name, []))
            first = next(iter(results.values()))
            if readers == set(uses) and all(r.shape == first.shape and np.array_equal(r, first)
                                            for r in results.values()):
                self.initializers[name].CopyFrom(numpy_helper.from_array(first, name))
                continue
            for use, value in results.items():  # readers that disagree: each changed one gets its own copy
                self._attach(use, value, name)
        for use in self.created:
            self._attach(use, self.sliced(use), f"{graph.node[use[0]].name or 'node'}.bias")

    def _attach(self, use: Use, value: np.ndarray, base: str) -> None:
        node = self.graph.node[use[0]]
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        while len(node.input) <= use[1]:
            node.input.append("")
        node.input[use[1]] = name


def remove_units(model: onnx.ModelProto, channels: ChannelGraph, removal: dict[int, list[int]],
                 folds: list[Fold]) -> onnx.ModelProto:
    """A copy of `model` (the graph `channels` was read from) without the units `removal` lists per space
    root, with `folds` added into the consumers' biases."""
    edit = _Edit(model, channels)
    graph = edit.graph
    for fold in folds:
        edit.fold(fold)
    producers, depthwise, reshapes = {}, set(), {}
    for root, units in removal.items():
        if not units:
            continue
        space = channels.spaces[root]
        for cut in space.cuts:
            edit.drop((cut.node, cut.input), cut.axis, unit_features(cut.start, cut.stride, units))
        for producer in space.producers:
            producers[producer.node] = producer
        depthwise.update(space.depthwise)
        for node, area in space.reshapes:
            reshapes[node] = reshapes.get(node, 0) + area * len(units)
    for producer in producers.values():  # biases after the folds, which may have created or widened them
        removed = edit.output_units(producer.output, removal)
        if producer.bias_input is None:
            if producer.node in edit.inserted:
                edit.inserted[producer.node] = np.delete(edit.inserted[producer.node], removed, axis=-1)
            continue
        use = (producer.node, producer.bias_input)
        node = graph.node[producer.node]
        if use in edit.values or (len(node.input) > use[1] and node.input[use[1]]):
            width = channels.spaces[channels.find(channels.segments[producer.output][0].space)].width
            if edit.current(use).ndim and edit.current(use).shape[-1] == width:
                edit.drop(use, -1, removed)
    for node, removed in reshapes.items():  # a hard-coded feature count drops the removed channels' features
        shape_name = graph.node[node].input[1]
        shape = numpy_helper.to_array(edit.initializers[shape_name]).copy()
        shape[1] -= removed
        edit.values[(node, 1)] = shape
    edit.write()
    for node in depthwise:
        weight = next(i for i in graph.initializer if i.name == graph.node[node].input[1])
        for attr in graph.node[node].attribute:
            if attr.name == "group":
                attr.i = int(weight.dims[0])
    _insert_biases(edit)
    del graph.value_info[:]
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return edit.model


def _insert_biases(edit: _Edit) -> None:
    """An Add of the folded bias after each MatMul that had none (in reverse, so earlier indices hold)."""
    graph = edit.graph
    for index in sorted(edit.inserted, reverse=True):
        node = graph.node[index]
        out = node.output[0]
        product = edit.fresh(f"{node.name or 'matmul'}.product")
        bias = edit.fresh(f"{node.name or 'matmul'}.bias")
        graph.initializer.append(numpy_helper.from_array(np.asarray(edit.inserted[index]), bias))
        node.output[0] = product
        graph.node.insert(index + 1, onnx.helper.make_node("Add", [product, bias], [out], name=edit.fresh("bias_add")))
