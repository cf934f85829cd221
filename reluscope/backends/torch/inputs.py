"""What a model expects of its inputs, and what went wrong when they did not fit: the dtype
cast for calibration data, and the hints and error lines of shape mismatches."""

from __future__ import annotations

import math

from typing import Any, Callable




def _first_layer(module: Any) -> tuple[str, str, Any] | None:
    """(qualified name, class name, module) of the first submodule holding parameters of its own."""
    import torch

    for name, sub in module.named_modules():
        if next(iter(sub.parameters(recurse=False)), None) is not None:
            # a TorchScript module keeps its Python class name in original_name
            kind = sub.original_name if isinstance(sub, torch.jit.ScriptModule) else type(sub).__name__
            return name, kind, sub
    return None


def _exported_inputs(module: Any) -> list[tuple[str, tuple[int | None, ...], Any]] | None:
    """(name, shape with None for dynamic sizes, dtype) of each input of an exported graph, from its
    placeholders' example values; None for other modules."""
    import torch

    if not isinstance(module, torch.fx.GraphModule):
        return None
    specs = []
    for node in module.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                return None
            specs.append((node.name, tuple(d if isinstance(d, int) else None for d in value.shape), value.dtype))
    return specs or None


def fixed_batch_size(module: Any) -> int | None:
    """The batch size a torch.export graph was exported with, where it is fixed (not a dynamic Dim)."""
    specs = _exported_inputs(module)
    firsts = {dims[0] if dims else None for _, dims, _ in specs or ()}
    if len(firsts) != 1:
        return None
    first = next(iter(firsts))
    return first if isinstance(first, int) and first > 0 else None


def expectation(module: Any, shapes: list[tuple[int, ...]]) -> str | None:
    """What the model expects, when that is cheap to know and disagrees with the data: an exported
    graph's input shapes, else the in_features/in_channels of a first Linear/Conv layer."""
    try:
        specs = _exported_inputs(module)
        if specs is not None:
            wanted = [dims for _, dims, _ in specs]

            def fits(want: tuple[int | None, ...], got: tuple[int, ...]) -> bool:
                return len(want) == len(got) and all(d is None or d == n for d, n in zip(want, got))

            if len(wanted) == len(shapes) and all(map(fits, wanted, shapes)):
                return None  # the shapes fit: the error is about something else
            text = ", ".join("(" + ", ".join("batch" if d is None and i == 0 else "?" if d is None else str(d)
                                             for i, d in enumerate(dims)) + ")" for dims in wanted)
            return f"the model expects {text}"
        first = _first_layer(module)
        if first is None or len(shapes) != 1 or not shapes[0]:
            return None
        name, kind, layer = first
        shape = shapes[0]
        if kind == "Linear" and layer.in_features not in (shape[-1], math.prod(shape[1:])):
            return f"its first layer {name} (Linear) takes {layer.in_features} input features"
        if kind in ("Conv1d", "Conv2d", "Conv3d") and (len(shape) < 2 or shape[1] != layer.in_channels):
            return f"its first layer {name} ({kind}) takes {layer.in_channels} input channels"
    except Exception:  # noqa: BLE001 - a hint must never hide the model's own error
        return None
    return None


def _beyond_range(tensor: Any, wanted: Any) -> float | None:
    """The largest finite magnitude in `tensor` when it is beyond what floating dtype `wanted` holds
    (cast, it would become inf), else None. Checked only where the source dtype can hold such values."""
    import torch

    limit = torch.finfo(wanted).max
    source = torch.finfo(tensor.dtype).max if tensor.is_floating_point() else torch.iinfo(tensor.dtype).max
    if source <= limit or tensor.numel() == 0:
        return None
    low, high = torch.aminmax(tensor)  # NaN/Inf fall through to the exact check below
    if max(float(high), -float(low)) <= limit:
        return None
    magnitude = tensor.abs() if tensor.is_floating_point() else tensor.double().abs()
    if tensor.is_floating_point():
        magnitude = torch.where(torch.isfinite(tensor), magnitude, torch.zeros((), dtype=magnitude.dtype,
                                                                               device=magnitude.device))
    largest = float(magnitude.max())
    return largest if largest > limit else None


def input_caster(module: Any, warnings_out: list[str]) -> Callable[[Any], Any]:
    """Calibration inputs cast to the floating dtype the model computes in: integer images (uint8
    pixels) or float64/float16 files would otherwise fail in the first layer. Data keeps its dtype
    up to here (a float64 model gets float64 data as it is).

    Each kind of cast warns once: integers and float16/float32 into another float dtype say so;
    float64 (numpy's default) into float32 is silent, unless values are beyond the range of
    the dtype cast to (1e300 into float32 becomes inf): that warns, for any source dtype.

    Integers are left alone where they are meant to be integers: an exported graph's inputs say
    their dtype; otherwise a model whose first parameterised layer is an Embedding takes token ids.
    A model without floating parameters gives nothing to go by: float64 then becomes torch's
    default dtype (float32), as before."""
    import torch

    specs = _exported_inputs(module)
    fallback = None  # for models that say nothing: float64 data only, to torch's default dtype
    if specs is not None:  # per input, by position and by name
        by_position: list[Any] = [dtype for _, _, dtype in specs]
        by_name = {name: dtype for name, _, dtype in specs}
        default = None
    else:  # every input: the dtype of the first layer's weights
        first = _first_layer(module)
        default = None
        if first is not None and first[1] not in ("Embedding", "EmbeddingBag"):
            default = next((p.dtype for p in first[2].parameters(recurse=False) if p.is_floating_point()), None)
        if default is None:
            fallback = torch.get_default_dtype()
        by_position, by_name = [], {}
    warned: set[tuple[Any, ...]] = set()

    def say(key: tuple[Any, ...], message: str) -> None:
        if key not in warned:
            warned.add(key)
            warnings_out.append(message)

    def one(tensor: Any, wanted: Any) -> Any:
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            return tensor
        if wanted is None and fallback is not None and tensor.dtype == torch.float64:
            wanted = fallback
        if wanted is None or not wanted.is_floating_point or tensor.dtype == wanted:
            return tensor
        have, want = str(tensor.dtype).replace("torch.", ""), str(wanted).replace("torch.", "")
        largest = _beyond_range(tensor, wanted)
        if largest is not None:
            say(("range", tensor.dtype, wanted),
                f"calibration input ({have}) holds values beyond the range of {want}, the dtype the model computes "
                f"in (largest magnitude {largest:.3g}): cast, they become inf")
        if not (tensor.dtype == torch.float64 and wanted == torch.float32):  # numpy default, model default: no news
            rescale = "" if tensor.is_floating_point() else " (values are not rescaled: scale integer pixels as " \
                "the model was trained, e.g. to 0..1)"
            say(("cast", tensor.dtype, wanted), f"calibration input is {have}, the model computes in {want}: cast{rescale}")
        return tensor.to(wanted)

    def cast(inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return {k: one(v, by_name.get(k, default)) for k, v in inputs.items()}
        return tuple(one(v, by_position[i] if i < len(by_position) else default) for i, v in enumerate(inputs))

    return cast
