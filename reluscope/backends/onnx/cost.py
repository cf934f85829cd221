"""What an ONNX model costs (parameters, multiply-accumulates, CPU latency), and its bytes as a file:
the before/after figures and the output of `reluscope prune`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ...errors import UsageError, first_line
from ...measure.outputs import median_seconds
from .channels import attribute
from .graph import true_inputs
from .session import PROTOBUF_LIMIT, fixed_batch_chunks, graph_feeds, open_session

if TYPE_CHECKING:
    from ...data import Batch

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})


def parameters(model: onnx.ModelProto) -> int:
    """Elements of the float constants: initializers and Constant nodes (exporters write weights as either)."""
    tensors = list(model.graph.initializer) + [attr.t for node in model.graph.node if node.op_type == "Constant"
                                               for attr in node.attribute if attr.name == "value"]
    return sum(math.prod(t.dims) for t in tensors if t.data_type in _FLOAT_TYPES)


def _shapes_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Static dims of every tensor with the graph's inputs fixed to the fed arrays' shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for tensor in fixed.graph.initializer:
        if math.prod(tensor.dims) > 1024:  # inference needs weights' shapes, not their values
            tensor.ClearField("raw_data")
    for value in fixed.graph.input:
        if value.name in feeds:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in feeds[value.name].shape:
                shape.dim.add().dim_value = int(size)
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed)
    graph = inferred.graph
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        found = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.HasField("shape") and all(found):
            dims[value.name] = found
    return dims


def macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], samples: int) -> int | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul per sample; None when shapes are unknown."""
    dims = _shapes_for(model, feeds)
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out, weight = dims.get(node.output[0]), dims.get(node.input[1])
        first = dims.get(node.input[0])
        if out is None or weight is None or first is None:
            return None
        if node.op_type == "Conv":  # each output element: in-channels per group x kernel
            total += math.prod(out) * math.prod(weight[1:])
        elif node.op_type == "ConvTranspose":  # each input element: out-channels per group x kernel
            total += math.prod(first) * math.prod(weight[1:])
        elif node.op_type == "Gemm":
            inner = first[0] if attribute(node, "transA", 0) else first[-1]
            total += math.prod(out) * inner
        else:
            total += math.prod(out) * first[-1]
    return total // max(samples, 1)


def cost(model: onnx.ModelProto, batch: Batch) -> dict[str, Any]:
    inputs = true_inputs(model.graph)
    feeds = graph_feeds(batch.inputs, inputs, lambda message: None)
    chunk, real, _ = next(fixed_batch_chunks(feeds, inputs))
    session = open_session(model, ["CPUExecutionProvider"])
    try:
        counted = macs(model, chunk, real)
    except Exception:  # noqa: BLE001 - shape inference refuses odd graphs: the figure is then unknown
        counted = None
    seconds = median_seconds(lambda: session.run(None, chunk))
    return {"parameters": parameters(model), "macs": counted, "latency_ms": seconds * 1000.0}


def check_suffix(suffix: str) -> None:
    if suffix.lower() != ".onnx":
        raise UsageError(f"a pruned ONNX model can only be written as .onnx (got {suffix or 'no suffix'}); give -o "
                         "a .onnx file")


def serialize(model: onnx.ModelProto, suffix: str) -> bytes:
    check_suffix(suffix)
    if sum(tensor.ByteSize() for tensor in model.graph.initializer) > PROTOBUF_LIMIT:
        raise UsageError("the pruned ONNX model is over 2 GB, more than one .onnx file can hold (protobuf's limit); "
                         "prune the PyTorch model instead")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise UsageError(f"the pruned ONNX model does not pass onnx.checker ({first_line(exc)}); "
                         "report this as a reluscope bug") from exc
    return model.SerializeToString()
