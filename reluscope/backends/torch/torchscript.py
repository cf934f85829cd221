"""TorchScript capture: rewrite the frozen graph so that it also returns every site's output.

Forward hooks raise on ScriptModules and a TorchFunctionMode sees nothing inside them, so
the sites are read off the TorchScript graph itself: freeze (which inlines submodules and
resolves `inplace` branches), find the ReLU-family nodes, make the graph return their
outputs next to the model's own, and compile that graph into a function. Site names come
from each node's module hierarchy, so they match the eager model's.
This uses private TorchScript graph APIs; they have been stable for years but are private.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...errors import InputError
from ...measure import sites as table
from ...measure.recorder import SiteRecorder
from ...measure.sites import CHANNEL, LAST
from .session import TorchSession

_HIERARCHY_PART = re.compile(r"([^.()]*)\(([^)]*)\)")


class _NotConstant:
    """Stands in for a non-constant argument: classify() reads scalars only."""


def _constant_args(node: torch._C.Node) -> list[Any]:
    values = []
    for value in node.inputs():
        producer = value.node()
        values.append(producer.output().toIValue() if producer.kind() == "prim::Constant" else _NotConstant())
    return values


def _base_name(node: torch._C.Node, op: str) -> str:
    path, last_type = [], ""
    for instance, type_name in _HIERARCHY_PART.findall(node.getModuleHierarchy()):
        if instance and instance not in ("UNKNOWN_INSTANCE", "SELF"):
            path.append(instance)
            last_type = type_name
    name = ".".join(path)
    if name and table.is_activation_module(last_type):
        return name
    return table.functional_site_name(name, op)


def _layout(value: torch._C.Value, depth: int = 0) -> str | None:
    """Walk back from an activation's input through per-element ops to the producing layer."""
    node = value.node()
    name = table.normalize_op_name(node.kind())
    if name in table.CHANNEL_PRODUCERS:
        return CHANNEL
    if name in table.LAST_AXIS_PRODUCERS:
        return LAST
    if depth < 16 and (name in table.PASSTHROUGH_OPS or table.classify(name, _constant_args(node)) is not None):
        for inp in node.inputs():
            if isinstance(inp.type(), torch._C.TensorType):
                found = _layout(inp, depth + 1)
                if found is not None:
                    return found
    return None


def _mutated_later(value: torch._C.Value) -> bool:
    """True when an in-place op writes to `value` after it is produced."""
    return any(use.user.kind().endswith("_") and use.offset == 0 for use in value.uses())


class ScriptCapture(TorchSession):
    """Runs a ScriptModule through a rewritten graph; every site output is fed to `recorder`."""

    def __init__(self, module: torch.jit.ScriptModule, recorder: SiteRecorder) -> None:
        super().__init__(module, recorder)
        self._module = module
        self._checked: set[Any] = set()
        # Parameters stay attributes (not folded into constants) so that gradients can reach them.
        self._parameter_names = [name for name, _ in module.named_parameters()]
        try:
            self._frozen = torch.jit.freeze(module.eval(), preserved_attrs=self._parameter_names,
                                            optimize_numerics=False)
        except Exception as exc:  # noqa: BLE001 - TorchScript raises plain RuntimeErrors
            raise InputError(f"cannot freeze the TorchScript module for analysis: {exc}".splitlines()[0]) from exc
        graph = self._frozen.forward.graph.copy()
        self._plan: list[tuple[str, table.Activation, str | None, bool]] = []
        extra_outputs: list[torch._C.Value] = []
        for node in list(graph.nodes()):
            name = table.normalize_op_name(node.kind())
            act = table.classify(name, _constant_args(node)) if node.kind().startswith("aten::") else None
            if act is None:
                continue
            out = node.output()
            if act.inplace or _mutated_later(out):
                # Return a copy taken right here: later in-place ops would change the value.
                no_format = graph.insertConstant(None)
                clone = graph.create("aten::clone", [out, no_format])
                clone.insertAfter(node)
                no_format.node().moveBefore(clone)
                clone.output().setType(out.type())
                out = clone.output()
            extra_outputs.append(out)
            wants_input = act.active_from_input
            if wants_input:
                extra_outputs.append(node.inputsAt(0))
            self._plan.append((_base_name(node, act.op), act, _layout(node.inputsAt(0)), wants_input))
        for node in graph.nodes():
            for block in node.blocks():
                for inner in block.nodes():
                    act = table.classify(table.normalize_op_name(inner.kind()), _constant_args(inner))
                    if act is not None:
                        self.unanalysed.append({
                            "name": _base_name(inner, act.op),
                            "reason": "inside TorchScript control flow (prim::If/prim::Loop); not analysed",
                        })
        for value in extra_outputs:
            graph.registerOutput(value)
        graph.makeMultiOutputIntoTuple()
        self._function = torch._C._create_function_from_graph("reluscope_forward_with_sites", graph)

    def _precheck(self, inputs: tuple[Any, ...]) -> None:
        """Inputs of a shape and dtype not seen yet run through the unfrozen module first.

        Freezing deletes the submodule methods it inlined, but the inlined nodes' call stacks keep
        raw pointers to them, which TorchScript follows only to word an error: a frozen model that
        raises (a Conv2d given 3 channels instead of 1) crashed the process with a segmentation
        fault (torch 2.13). The unfrozen module raises cleanly. One sample is enough to check; the
        whole batch runs only when one sample fails (a model may hard-code its batch size).
        Errors that depend on the values of later batches are not caught this way."""
        key = tuple((tuple(v.shape[1:]), v.dtype) if isinstance(v, torch.Tensor) else type(v) for v in inputs)
        if key in self._checked:
            return
        with torch.no_grad():
            try:
                self._module(*(v[:1] if isinstance(v, torch.Tensor) and v.dim() else v for v in inputs))
            except Exception:  # noqa: BLE001 - try the real batch: its error (if any) is the one to report
                self._module(*inputs)
        self._checked.add(key)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors the rewritten graph reads, under the original module's parameter names."""
        out = []
        for name in self._parameter_names:
            value: Any = self._frozen
            for part in name.split("."):
                value = getattr(value, part)
            out.append((name, value))
        return out

    def __exit__(self, *exc: Any) -> None:
        return None  # the rewritten graph is a copy: nothing of the module was touched

    def run(self, inputs: tuple[Any, ...] | dict[str, Any]) -> Any:
        if isinstance(inputs, dict):
            raise InputError("TorchScript models take positional inputs: give the data as one array or a tuple")
        self._precheck(inputs)
        self.recorder.begin_forward()
        # Without this, the profiling executor fuses the graph into a DifferentiableGraph after
        # a few runs, and gradients stop reaching the extra site outputs.
        with torch.jit.optimized_execution(False):
            results = self._function(self._frozen._c, *inputs)
        position = 1
        for base, act, layout, wants_input in self._plan:
            out = results[position]
            inp = results[position + 1] if wants_input else None
            position += 2 if wants_input else 1
            self.recorder.record(base, act, out, inp, layout=layout)
        return results[0]
