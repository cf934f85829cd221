"""Eager and torch.export capture: a TorchFunctionMode sees every ReLU-family call.

Module hooks miss `F.relu`, `torch.relu`, `x.relu_()`; a TorchFunctionMode sees all of them
(and the aten ops a `torch.export` GraphModule calls). Names come from a module stack kept by
global module pre/post hooks (torch.utils.module_tracker's pattern), or, for an exported
graph whose modules were flattened away, from each node's `nn_module_stack`. Nothing in
torch is patched; everything registered is removed on exit, also when forward raises.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ...measure import sites as table
from ...measure.recorder import SiteRecorder
from ...measure.sites import CHANNEL, LAST
from .session import TorchSession

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(getattr(nn, name) for name in table.ACTIVATION_MODULE_NAMES)

# Cheap pre-filter: names that may be a site (classify() decides with the arguments).
_CANDIDATES = frozenset(
    name + suffix
    for name in ("relu", "relu6", "hardtanh", "clamp", "clip", "clamp_min", "leaky_relu", "prelu",
                 "_prelu_kernel", "elu", "selu", "celu", "gelu", "silu", "hardswish", "hardsigmoid", "mish")
    for suffix in ("", "_")
)
_LAYOUT_ATTR = "_reluscope_layout"


def _op_name(func: Callable[..., Any], cache: dict[Any, str]) -> str:
    name = cache.get(func)
    if name is None:
        if isinstance(func, torch._ops.OpOverload):
            name = func._schema.name.split("::", 1)[-1]
        else:
            name = getattr(func, "__name__", "") or ""
        cache[func] = name
    return name


def _tag(value: Any, layout: str) -> None:
    target = value[0] if isinstance(value, (tuple, list)) and value else value
    if isinstance(target, torch.Tensor):
        try:
            setattr(target, _LAYOUT_ATTR, layout)
        except (AttributeError, RuntimeError):
            pass  # some tensor subclasses refuse attributes; the rank heuristic takes over


def _first_layout(args: Sequence[Any]) -> str | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            layout = getattr(arg, _LAYOUT_ATTR, None)
            if layout is not None:
                return layout
    return None


def export_site_plan(graph_module: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(base name, op) for each activation node of an exported graph, in execution order."""
    plan = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._schema.name.split("::", 1)[-1]
        if name not in _CANDIDATES:
            continue
        act = table.classify(name, node.args, node.kwargs)
        if act is None:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path, type_name = stack[-1] if stack else ("", "")
        if not isinstance(type_name, str):
            type_name = f"{type_name.__module__}.{type_name.__qualname__}"
        path = _clean_export_path(path)
        if table.is_activation_module(type_name) and path:
            plan.append((path, act.op))
        else:
            plan.append((table.functional_site_name(path, act.op), act.op))
    return plan


def _clean_export_path(path: str) -> str:
    """nn_module_stack paths may look like "L['self'].layer1[0].relu" in some versions."""
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    # torch.export marks repeated calls of one module as "relu@1": the call index is ours to add
    return path.split("@", 1)[0]


class _ActivationMode(TorchFunctionMode):
    def __init__(self, capture: "TorchCapture") -> None:
        super().__init__()
        self.capture = capture
        self.names: dict[Any, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func, self.names)
        if name in _CANDIDATES:
            act = table.classify(name, args, kwargs)
            if act is not None and isinstance(out, torch.Tensor):
                inp = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input")
                layout = getattr(inp, _LAYOUT_ATTR, None) if inp is not None else None
                self.capture.on_activation(act, out, inp, layout)
                if layout is not None:
                    _tag(out, layout)  # an activation keeps its input's unit layout
        elif name in table.CHANNEL_PRODUCERS:
            _tag(out, CHANNEL)
        elif name in table.LAST_AXIS_PRODUCERS:
            _tag(out, LAST)
        elif name in table.PASSTHROUGH_OPS:
            layout = _first_layout(args)
            if layout is not None:
                _tag(out, layout)
        return out


class TorchCapture(TorchSession):
    """Context manager: while active, `run(inputs)` feeds every activation call into `recorder`."""

    def __init__(self, model: nn.Module, recorder: SiteRecorder, plan: list[tuple[str, str]] | None = None) -> None:
        super().__init__(model, recorder)
        self.plan = plan  # names for flattened exported graphs
        self._names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(module), name)  # a shared module keeps its first name
        self._stack: list[nn.Module] = []
        self._handles: list[RemovableHandle] = []
        self._mode: _ActivationMode | None = None
        self._plan_index = 0

    # module stack ----------------------------------------------------------
    def _push(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        return None  # anything else would replace the module's output

    def _site_base(self, act: table.Activation) -> str:
        if self.plan is not None:
            if self._plan_index < len(self.plan) and self.plan[self._plan_index][1] == act.op:
                base = self.plan[self._plan_index][0]
            else:  # the graph ran differently from its node list: still a site, named by op
                base = table.functional_site_name("", act.op)
            self._plan_index += 1
            return base
        for module in reversed(self._stack):
            name = self._names.get(id(module))
            if name is None:
                continue  # a module outside the analysed model
            if isinstance(module, ACTIVATION_MODULES) and name:
                return name
            return table.functional_site_name(name, act.op)
        return table.functional_site_name("", act.op)

    def on_activation(self, act: table.Activation, out: torch.Tensor, inp: torch.Tensor | None,
                      layout: str | None) -> None:
        base = self._site_base(act)
        self.recorder.record(base, act, out, inp if act.active_from_input else None, layout=layout)

    # lifecycle -------------------------------------------------------------
    def __enter__(self) -> "TorchCapture":
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._push),
            nn.modules.module.register_module_forward_hook(self._pop, always_call=True),
        ]
        self._mode = _ActivationMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._stack.clear()
            self._mode = None

    def run(self, inputs: tuple[Any, ...] | dict[str, Any]) -> Any:
        self.recorder.begin_forward()
        self._plan_index = 0
        self._stack.clear()
        if isinstance(inputs, dict):
            return self.model(**inputs)
        return self.model(*inputs)
