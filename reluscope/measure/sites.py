"""The ReLU-family table: which calls are activation sites and how to measure them.

Shared by every capture route (eager TorchFunctionMode, torch.export graphs, TorchScript
graphs), so that one model gives the same sites whichever format it was saved in.
Classification works on an op *name* plus its arguments, so it serves Python callables
(`F.relu`, `Tensor.relu_`), aten overloads (`aten.relu.default`) and TorchScript node
kinds (`aten::relu`) alike.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import UsageError


@dataclass(frozen=True)
class Activation:
    """What a site computes, as far as the statistics care."""

    op: str  # report label: relu, relu6, clamp, leaky_relu, prelu, elu, selu, celu, gelu, silu, hardswish, mish,
    #          hardsigmoid; ONNX graphs add thresholded_relu
    hard_zero: bool  # True when every inactive output is exactly 0 (ReLU, ReLU6, clamp(min=0))
    upper: float | None = None  # saturation bound (ReLU6's 6, clamp's max)
    active_from_input: bool = False  # PReLU: a negative slope can make outputs of negative inputs positive
    inplace: bool = False

    @property
    def has_dormant_score(self) -> bool:
        """The tau-dormant score is reported for activations with no hard zero."""
        return not self.hard_zero


# Position of the `inplace` argument in the functional signatures (F.relu(input, inplace), ...).
_INPLACE_ARG = {
    "relu": 1,
    "relu6": 1,
    "hardtanh": 3,
    "leaky_relu": 2,
    "elu": 2,
    "celu": 2,
    "selu": 1,
    "silu": 1,
    "hardswish": 1,
    "hardsigmoid": 1,
    "mish": 1,
}

_SMOOTH = {"leaky_relu", "elu", "selu", "celu", "gelu", "silu", "hardswish", "mish"}


def activation(op: str, *, inplace: bool = False) -> Activation:
    """The Activation a report label stands for, wherever it was found (torch call, ONNX node)."""
    if op == "relu":
        return Activation("relu", hard_zero=True, inplace=inplace)
    if op == "prelu":
        return Activation("prelu", hard_zero=False, active_from_input=True)
    if op == "hardsigmoid":  # MobileNetV3's gates: exactly 0 below -3, saturates at 1
        return Activation("hardsigmoid", hard_zero=True, upper=1.0, inplace=inplace)
    if op in _SMOOTH:
        return Activation(op, hard_zero=False, inplace=inplace)
    raise ValueError(f"not a ReLU-family label: {op!r}")


def clamped(high: float | None, *, inplace: bool = False) -> Activation:
    """A ReLU with an optional upper bound (clamp(min=0, max=high), hardtanh(0, high), Clip(0, high)):
    relu6 at 6, clamp otherwise; no bound, or one at float32's maximum, means no saturation."""
    if high is not None and high >= FLOAT32_MAX:
        high = None
    if high == 6:
        return Activation("relu6", hard_zero=True, upper=6.0, inplace=inplace)
    return Activation("clamp", hard_zero=True, upper=None if high is None else float(high), inplace=inplace)


FLOAT32_MAX = 3.4028234e38


def hard_zero_label(op: str) -> bool:
    """Whether a report's `op` label is an activation whose inactive outputs are exactly 0 (a dead unit there
    outputs 0 on every sample, so removing it changes nothing downstream)."""
    if op in ("relu6", "clamp"):  # the labels clamped() gives
        return True
    try:
        return activation(op).hard_zero
    except ValueError:  # labels only some formats have (thresholded_relu)
        return False

# Ops that keep the unit layout of their input: an activation after them has the same unit
# axis as the layer that produced their input (BatchNorm after a conv, a bias add, dropout).
PASSTHROUGH_OPS = frozenset(
    {
        "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__isub__",
        "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__",
        "batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
        "native_batch_norm", "instance_norm", "group_norm", "layer_norm", "native_layer_norm",
        "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout2d", "dropout3d",
        "clone", "contiguous", "detach", "to", "_to_copy", "neg", "__neg__",
    }
)

# Layers whose output carries units on the channel axis (1) or on the last axis.
CHANNEL_PRODUCERS = frozenset(
    {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
     "convolution", "_convolution", "conv_tbc"}
)
LAST_AXIS_PRODUCERS = frozenset(
    {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "bilinear"}
)


# torch.nn activation modules: a site inside one of these is named after the module itself.
ACTIVATION_MODULE_NAMES = frozenset({"ReLU", "ReLU6", "Hardtanh", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU",
                                     "SiLU", "Hardswish", "Hardsigmoid", "Mish"})


def is_activation_module(type_name: str) -> bool:
    """`ReLU` (a TorchScript class name) or `torch.nn.modules.activation.ReLU` (export and ONNX metadata)."""
    package, _, name = type_name.rpartition(".")
    return name in ACTIVATION_MODULE_NAMES and (not package or package.startswith("torch.nn"))


def functional_site_name(enclosing: str, op: str) -> str:
    """Name of a functional call (F.relu, torch.relu, x.relu_()) made in `enclosing`'s forward.

    The "()" keeps it apart from a child module that happens to be called `relu`.
    """
    return f"{enclosing}.{op}()" if enclosing else f"{op}()"


def call_names(bases: Sequence[str | None]) -> list[str | None]:
    """Site names for a run's calls in order: `base` when a base is called once, `base#k` for its
    k-th call (from 0) when it is called more than once. None (no name known) stays None."""
    counts = Counter(base for base in bases if base is not None)
    repeated = {base for base, count in counts.items() if count > 1}
    seen: dict[str, int] = {}
    names: list[str | None] = []
    for base in bases:
        if base in repeated:
            names.append(f"{base}#{seen.setdefault(base, 0)}")
            seen[base] += 1
        else:
            names.append(base)
    return names


def normalize_op_name(name: str) -> str:
    """'aten::relu_' / 'aten.relu_.default' / 'relu_' -> 'relu_'."""
    if "::" in name:
        name = name.split("::", 1)[1]
    return name


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    if len(args) > index:
        return args[index]
    return default


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def classify(name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Activation | None:
    """Return the Activation for a call of op `name`, or None when it is not a ReLU-family site.

    `args`/`kwargs` are the call's arguments (tensors may be anything: only scalars are read).
    """
    kwargs = kwargs or {}
    name = normalize_op_name(name)
    trailing_inplace = name.endswith("_") and not name.endswith("__")
    base = name[:-1] if trailing_inplace else name
    if base in _INPLACE_ARG:
        flag = _arg(args, kwargs, _INPLACE_ARG[base], "inplace", False)
        inplace = trailing_inplace or flag is True
    else:
        inplace = trailing_inplace

    if base == "relu":
        return activation("relu", inplace=inplace)
    if base == "relu6":
        return clamped(6.0, inplace=inplace)
    if base == "hardtanh":
        low = _arg(args, kwargs, 1, "min_val", -1.0)
        high = _arg(args, kwargs, 2, "max_val", 1.0)
        if not _is_zero(low):
            return None
        return clamped(float(high), inplace=inplace)
    if base in ("clamp", "clip", "clamp_min"):
        low = _arg(args, kwargs, 1, "min", None)
        high = None if base == "clamp_min" else _arg(args, kwargs, 2, "max", None)
        if not _is_zero(low):
            return None
        if high is not None and not isinstance(high, (int, float)):
            return None  # a tensor bound: not a fixed saturation level
        return clamped(None if high is None else float(high), inplace=inplace)
    if base == "hardsigmoid":
        return activation("hardsigmoid", inplace=inplace)
    if base in ("prelu", "_prelu_kernel"):
        return activation("prelu")
    if base in _SMOOTH:
        return activation(base, inplace=inplace)
    return None


# How a producing layer lays out units: "channel" (axis 1 of a batch, conv outputs) or
# "last" (linear/matmul outputs).
CHANNEL = "channel"
LAST = "last"


def resolve_unit_axis(sample_ndim: int, layout: str | None, override: int | None) -> int:
    """Per-sample unit axis from the producer's layout, an explicit override, or the tensor rank."""
    if sample_ndim == 0:
        return 0
    if override is not None:
        axis = override if override >= 0 else sample_ndim + override
        if not 0 <= axis < sample_ndim:
            raise UsageError(
                f"--unit-axis {override} is out of range for a site whose per-sample shape has {sample_ndim} axes"
            )
        return axis
    if layout == CHANNEL:
        return 0
    if layout == LAST:
        return sample_ndim - 1
    # No producer seen (e.g. an activation on a model input): channel-first for image-like
    # ranks (C,H,W / C,D,H,W), the last axis otherwise.
    return 0 if sample_ndim >= 3 else sample_ndim - 1


@dataclass(frozen=True)
class SiteInfo:
    """Where a site is and how its units are laid out."""

    name: str
    op: str
    shape: tuple[int, ...]
    unit_axis: int
    tensor: str | None = None  # ONNX: the output tensor's name
    module: str | None = None  # ONNX: the PyTorch site name, when the exporter recorded it
    node: str | None = None  # ONNX: the node's name
