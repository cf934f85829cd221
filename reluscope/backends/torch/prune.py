"""Pruning an `nn.Module`: remove units a calibration set proves dead, keep the outputs.

Torch-Pruning's DependencyGraph (traced once per copy, through autograd) says which channels are
coupled: a unit removed at one activation takes with it the producer's output channel, every
per-channel layer on the way (BatchNorm, a residual add's other branches, a depthwise
convolution) and the matching input channel of each consumer. What it cannot know, and this
module adds, is whether the removal is exact:

* each activation site in the coupled group must have the unit among its candidates (dead at a
  hard-zero site: its output is exactly 0 on every sample), and no group may reach the model's
  output;
* what a consumer loses is the removed channel of its input. Where that input is constant on the
  calibration data (0 after a dead ReLU, BatchNorm's shift after one), the constant times the
  consumer's weights goes into its bias; where it varies, the unit stays. At a zero-padded
  convolution a folded constant is not exact at the borders: such a group is applied only if
  the verification holds;
* last, the original and the pruned copy run on the calibration data: above the tolerance, groups
  are applied one at a time and those that break the outputs are left out, with the reason.

Site names come from the same TorchFunctionMode capture `analyze` uses, run during the graph's
trace: each site's output tensor carries the autograd node the DependencyGraph is keyed by.
"""

from __future__ import annotations

import copy
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..._version import __version__
from ...errors import InputError, UsageError, first_line
from ...measure.outputs import OutputCheck, median_seconds
from ...measure.sites import call_names
from ..base import PruneRequest, Pruning
from .capture import TorchCapture
from .devices import prepared_module, to_device
from .inputs import fixed_batch_size, input_caster
from .load import PRUNED_KEY, torch_export_logs

_CPU = torch.device("cpu")
_PER_UNIT = (nn.modules.batchnorm._BatchNorm, nn.PReLU)  # one parameter per unit: sliced with it
_NORMS_OVER_CHANNELS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


# ----------------------------------------------------------------------------- tracing
class _SiteNames:
    """Stands in for the SiteRecorder during the trace: keeps each activation call's base name and
    the autograd node of its output, named as the recorder names sites (`call_names`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def begin_forward(self) -> None:
        self.calls.clear()

    def record(self, base: str, activation: Any, output: Any, inp: Any = None, **_: Any) -> None:
        self.calls.append((base, getattr(output, "grad_fn", None)))

    def nodes(self) -> dict[str, Any]:
        names = call_names([base for base, _ in self.calls])
        return {name: grad_fn for name, (_, grad_fn) in zip(names, self.calls) if name and grad_fn is not None}


@dataclass
class _Traced:
    graph: Any  # torch_pruning.DependencyGraph
    site_node: dict[str, Any]  # site name -> the graph's node of that activation
    node_site: dict[Any, str]


def _trace(model: nn.Module, example: Any) -> _Traced:
    import torch_pruning as tp

    names = _SiteNames()

    def forward(module: nn.Module, inputs: Any) -> Any:
        capture = TorchCapture(module, names)  # type: ignore[arg-type] - records names only
        with capture:
            return capture.run(inputs)

    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=forward,
                                                          verbose=False)
    except Exception as exc:  # noqa: BLE001 - tracing runs the model's own code
        raise InputError(f"cannot trace the model's layers for pruning: {first_line(exc)}") from exc
    by_grad_fn = {grad_fn: name for name, grad_fn in names.nodes().items()}
    site_node = {}
    for node in graph.module2node.values():
        name = by_grad_fn.get(node.grad_fn)
        if name is not None:
            site_node[name] = node
    return _Traced(graph, site_node, {node: name for name, node in site_node.items()})


# ----------------------------------------------------------------------------- consumer inputs
@dataclass
class _Channels:
    """Per input channel of one consumer layer, over the calibration data: min, max and mean."""

    low: torch.Tensor
    high: torch.Tensor
    total: torch.Tensor
    count: int = 0

    def constant(self, index: int) -> bool:
        return bool(self.low[index] == self.high[index])

    def mean(self, index: int) -> float:
        return float(self.total[index] / max(self.count, 1))


def _channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _consumer_inputs(model: nn.Module, batches: list[Any]) -> dict[str, _Channels]:
    """What every Conv/Linear layer of `model` receives, per input channel (one pass over the batches)."""
    seen: dict[str, _Channels] = {}
    handles = []

    def hook(name: str, module: nn.Module) -> Any:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            axis = _channel_axis(module) % x.dim()
            others = tuple(d for d in range(x.dim()) if d != axis)  # reduced in place: no float64 copy of x
            low, high = x.amin(others).double(), x.amax(others).double()
            total, count = x.sum(others, dtype=torch.float64), x.numel() // max(x.shape[axis], 1)
            old = seen.get(name)
            if old is None:
                seen[name] = _Channels(low, high, total, count)
            elif old.low.shape == low.shape:
                seen[name] = _Channels(torch.minimum(old.low, low), torch.maximum(old.high, high),
                                       old.total + total, old.count + count)
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(module.register_forward_pre_hook(hook(name, module)))
    try:
        with torch.no_grad():
            for inputs in batches:
                _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ----------------------------------------------------------------------------- planning
@dataclass
class _Group:
    """Units to remove from one coupled group, named by the site the group is rooted at."""

    site: str
    units: list[int]  # root indices (the site's own units)
    at_sites: dict[str, list[int]]  # every coupled site -> its removed units
    padded: list[str] = field(default_factory=list)  # zero-padded convolutions a nonzero constant is folded into
    rarely_active: bool = False  # some units are not dead: removing them is not exact

    @property
    def tentative(self) -> bool:
        """Not exact by construction: applied only if the outputs stay within the tolerance."""
        return bool(self.padded) or self.rarely_active


@dataclass
class _Plan:
    groups: list[_Group] = field(default_factory=list)
    kept: dict[str, dict[int, str]] = field(default_factory=dict)

    def keep(self, site: str, unit: int, reason: str) -> None:
        self.kept.setdefault(site, {}).setdefault(unit, reason)


def _cuts_inputs(graph: Any, item: Any) -> bool:
    """Whether a group item cuts input channels of a layer that reads the units (a consumer: what it loses
    is folded into its bias, or stops the unit), rather than slicing a producer, an op that passes units
    through, a per-unit layer or a depthwise convolution, which lose nothing the outputs need."""
    module = item.dep.target.module
    return graph.is_in_channel_pruning_fn(item.dep.handler) and not _traced_op(module) and \
        not isinstance(module, _PER_UNIT) and not _depthwise(module)


def _depthwise(module: Any) -> bool:
    """A depthwise convolution maps unit i to unit i: its units are coupled to its input's, and the coupled
    site after it decides."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and \
        module.groups == module.in_channels == module.out_channels


def _traced_op(module: Any) -> bool:
    """An op the graph made up for a function call (add, view, cat, a weight's transpose): it passes
    channels through, it has nothing to fold into."""
    return type(module).__module__.startswith("torch_pruning.")


def _layer_name(traced: _Traced, module: Any) -> str:
    name = traced.graph._module2name.get(module)
    return name if name else type(module).__name__


def _plan(traced: _Traced, candidates: dict[str, list[int]], inputs: dict[str, _Channels], exact: set[tuple[str, int]]
          ) -> _Plan:
    """Which candidates go, group by group, and why the others stay. `exact`: (site, unit) pairs that must be
    removed exactly (dead ones); the others (rarely active) are left to the verification."""
    import torch_pruning as tp

    graph = traced.graph
    plan = _Plan()
    decided: set[tuple[str, int]] = set()
    for site, units in candidates.items():
        node = traced.site_node.get(site)
        todo = sorted(u for u in units if (site, u) not in decided)
        if not todo:
            continue
        if node is None:
            for unit in todo:
                plan.keep(site, unit, "the site was not found in the traced layer graph")
            continue
        pruner = graph.get_pruner_of_module(node.module)
        group = graph.get_pruning_group(node.module, pruner.prune_out_channels, todo)
        removable = set(todo)
        why: dict[int, str] = {}
        coupled: dict[str, list[tuple[int, int]]] = {}  # other site -> (its unit, root unit)
        consumers: list[tuple[nn.Module, str, list[tuple[int, int]]]] = []  # (layer, its name, (channel, root unit))

        def drop(roots: Iterable[int], reason: str) -> None:
            for root in roots:
                if root in removable:
                    removable.discard(root)
                    why[root] = reason

        for item in group:
            target = item.dep.target
            module = target.module
            pairs = list(zip(item.idxs, item.root_idxs))
            if isinstance(module, tp.ops._OutputOp):
                drop(todo, "reaches the model's output")
                continue
            other = traced.node_site.get(target)
            if other is not None and other != site:
                coupled.setdefault(other, []).extend(pairs)
                theirs = set(candidates.get(other, ()))
                drop((root for unit, root in pairs if unit not in theirs),
                     f"active at coupled site {other}" if other in candidates else
                     f"coupled site {other} is not pruned (not a hard-zero activation, or left out by --sites)")
                continue
            if isinstance(module, nn.Parameter):
                drop(todo, "is read by a parameter outside any layer (e.g. a position embedding), which reluscope "
                           "does not cut")
                continue
            if isinstance(module, _NORMS_OVER_CHANNELS):
                drop(todo, f"feeds {type(module).__name__} {_layer_name(traced, module)}, which normalizes across "
                           "units")
                continue
            if not _cuts_inputs(graph, item):
                continue  # producers, ops that pass units through, per-unit layers: sliced along, nothing lost
            layer = _layer_name(traced, module)
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                drop(todo, f"feeds {type(module).__name__} {layer}, whose inputs reluscope cannot fold")
                continue
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
                drop(todo, f"feeds grouped convolution {layer}")
                continue
            seen = inputs.get(layer)
            if seen is None:
                drop(todo, f"feeds {layer}, which the calibration data never reached")
                continue
            drop((root for unit, root in pairs if (site, root) in exact and not seen.constant(unit)),
                 f"feeds {layer} with a varying value")
            consumers.append((module, layer, pairs))
        for other, pairs in coupled.items():
            decided.update((other, unit) for unit, _ in pairs)
        decided.update((site, u) for u in todo)
        group_units = sorted(removable)
        if group_units and not graph.check_pruning_group(graph.get_pruning_group(node.module, pruner.prune_out_channels,
                                                                                 group_units)):
            last = group_units.pop(0)  # a layer cannot lose every unit
            why[last] = "the last unit of a layer stays (a layer cannot have no units)"
        for root, reason in why.items():
            plan.keep(site, root, reason)
            for other, pairs in coupled.items():
                for unit, r in pairs:
                    if r == root and unit in candidates.get(other, ()):
                        plan.keep(other, unit, reason)
        if group_units:
            chosen = set(group_units)
            at_sites = {site: group_units}
            for other, pairs in coupled.items():
                at_sites[other] = sorted({unit for unit, root in pairs if root in chosen})
            padded = sorted({layer for module, layer, pairs in consumers if _zero_padded(module) and any(
                inputs[layer].mean(unit) != 0 for unit, root in pairs if root in chosen)})
            plan.groups.append(_Group(site, group_units, at_sites, padded,
                                      rarely_active=any((site, root) not in exact for root in group_units)))
    return plan


# ----------------------------------------------------------------------------- applying
def _fold(traced: _Traced, group: Any, inputs: dict[str, _Channels]) -> None:
    """Add what each consumer loses (its removed input channels' constant, times its weights) to its bias."""
    graph = traced.graph
    for item in group:
        module = item.dep.target.module
        if not _cuts_inputs(graph, item):
            continue  # the plan kept every unit that reaches any other reader, so this is a Conv or Linear
        layer = _layer_name(traced, module)
        seen = inputs[layer]
        values = torch.tensor([seen.mean(i) for i in item.idxs], dtype=torch.float64)
        if not bool(values.any()):
            continue
        weight = module.weight.detach().double()[:, list(item.idxs)]
        lost = weight.flatten(2).sum(2) @ values if weight.dim() > 2 else weight @ values
        with torch.no_grad():
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype,
                                                       device=module.weight.device))
            module.bias.add_(lost.to(module.bias.dtype))


def _zero_padded(module: nn.Module) -> bool:
    """A convolution whose borders read zeros: a constant input is not constant there (reflect,
    replicate and circular padding repeat the constant, so a fold stays exact)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.padding_mode != "zeros":
        return False
    return module.padding != "valid" if isinstance(module.padding, str) else any(module.padding)


def _apply(original: nn.Module, example: Any, groups: list[_Group], inputs: dict[str, _Channels]) -> nn.Module:
    """A copy of `original` with `groups` removed.

    Every group is taken from the unpruned graph and every layer is cut once, with the union of the
    indices all groups give it: a layer read by two groups (the convolution after a concatenation)
    would otherwise get stale offsets for the second group once the first had narrowed the concat."""
    model = copy.deepcopy(original).to(_CPU).eval()
    if not groups:
        return model
    traced = _trace(model, example)
    graph = traced.graph
    cuts: dict[tuple[int, Any], tuple[Any, set[int]]] = {}  # (layer, pruning function) -> (dependency, indices)
    for planned in groups:
        node = traced.site_node[planned.site]
        group = graph.get_pruning_group(node.module, graph.get_pruner_of_module(node.module).prune_out_channels,
                                        planned.units)
        _fold(traced, group, inputs)  # the folds read the unpruned weights, at the original indices
        for item in group:
            dep = item.dep
            cuts.setdefault((id(dep.target.module), dep.handler), (dep, set()))[1].update(item.idxs)
    for dep, indices in cuts.values():
        dep(sorted(indices))
    return model


# ----------------------------------------------------------------------------- running
def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _host(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().to(_CPU).double().numpy() if outputs.is_floating_point() else \
            outputs.detach().to(_CPU).numpy()
    if isinstance(outputs, dict):
        return {k: _host(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return [_host(v) for v in outputs]
    if hasattr(outputs, "to_tuple"):
        return _host(outputs.to_tuple())
    return outputs


def _outputs(model: nn.Module, batches: list[Any]) -> list[Any]:
    with torch.no_grad():
        return [_host(_call(model, inputs)) for inputs in batches]


def _check(reference: list[Any], model: nn.Module, batches: list[Any], sizes: list[int]) -> OutputCheck:
    check = OutputCheck()
    for ref, new, size in zip(reference, _outputs(model, batches), sizes):
        check.add(ref, new, size)
    return check


def prune_module(module: nn.Module, request: PruneRequest) -> Pruning:
    """`request.candidates` removed from a copy of `module` (on the CPU); `module` itself is not changed."""
    notes: list[str] = []
    with prepared_module(module, _CPU) as original:
        cast = input_caster(original, notes)
        batches = [cast(to_device(batch.inputs, _CPU)) for batch in request.batches]
        sizes = [batch.size for batch in request.batches]
        if not batches:
            raise InputError("the calibration data yielded no batch to prune with")
        reference = _outputs(original, batches)
        inputs = _consumer_inputs(original, batches)
        exact = {(site, unit) for site, units in request.candidates.items() for unit in units
                 if unit not in request.rarely_active.get(site, ())}
        traced = _trace(copy.deepcopy(original).eval(), batches[0])
        plan = _plan(traced, request.candidates, inputs, exact)
        del traced
        # exact groups go in together; the others one at a time, each kept only if the outputs stay close
        applied = [group for group in plan.groups if not group.tentative]
        pruned = _apply(original, batches[0], applied, inputs)
        check = _check(reference, pruned, batches, sizes)
        if check.passed(request.tolerance):
            for group in (group for group in plan.groups if group.tentative):
                trial = _apply(original, batches[0], [*applied, group], inputs)
                trial_check = _check(reference, trial, batches, sizes)
                if trial_check.passed(request.tolerance):
                    applied.append(group)
                    pruned, check = trial, trial_check
                else:
                    _keep_failed(plan, group, trial_check, request.tolerance)
    removed: dict[str, list[int]] = {}
    for planned in applied:
        for site, units in planned.at_sites.items():
            removed.setdefault(site, []).extend(units)
    return Pruning(model=pruned, removed={site: sorted(units) for site, units in removed.items()},
                   kept=plan.kept, check=check, notes=notes)


def _keep_failed(plan: _Plan, group: _Group, check: OutputCheck, tolerance: float) -> None:
    """A tentative group that moved the outputs too far stays, each of its units with the reason."""
    figure = check.mismatch or f"relative output difference {check.relative:.3g}"
    if group.padded:
        reason = (f"a constant folded into the zero-padded convolution {', '.join(group.padded)} is not exact at "
                  f"its borders ({figure}, above the tolerance {tolerance:g})")
    else:
        reason = f"not dead, and removing it moves the outputs too far ({figure}, above the tolerance {tolerance:g})"
    for site, units in group.at_sites.items():
        for unit in units:
            plan.keep(site, unit, reason)


# ----------------------------------------------------------------------------- cost and files
def cost(model: nn.Module, batch: Any) -> dict[str, Any]:
    """Parameters, multiply-accumulates per sample (torch's FLOP counter / 2) and the CPU latency of one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with prepared_module(model, _CPU) as module:
        inputs = input_caster(module, [])(to_device(batch.inputs, _CPU))
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                _call(module, inputs)
            latency = median_seconds(lambda: _call(module, inputs))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "macs": counter.get_total_flops() // 2 // max(batch.size, 1),
            "latency_ms": latency * 1e3}


def _any_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Exported graphs take any batch size (the first axis of every tensor input)."""
    def dims(value: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() else None

    if kwargs:
        return {name: dims(value) for name, value in kwargs.items()}
    return tuple(dims(value) for value in args)


def serialize(model: nn.Module, suffix: str, batch: Any) -> bytes:
    """A pruned module as the bytes of a .pt file (its state_dict, marked as pruned: `reluscope analyze`
    with the unpruned model's --arch resizes that model's layers to it; see load.adopt_pruned_shapes),
    a .pt2 (torch.export) or an .onnx file (both with any batch size)."""
    module = model.to(_CPU).eval()
    example = input_caster(module, [])(to_device(batch.inputs, _CPU))
    args, kwargs = ((), example) if isinstance(example, dict) else (tuple(example), {})
    buffer = io.BytesIO()
    try:
        if suffix == ".pt":
            torch.save({PRUNED_KEY: __version__, "state_dict": module.state_dict()}, buffer)
        elif suffix == ".pt2":
            with torch_export_logs():
                exported = torch.export.export(module, args, kwargs, dynamic_shapes=_any_batch(args, kwargs))
            torch.export.save(exported, buffer)
        elif suffix == ".onnx":
            return _onnx_bytes(module, args, kwargs, _any_batch(args, kwargs))
        else:
            raise UsageError(f"cannot write a pruned PyTorch model as {suffix or 'a file without a suffix'}; "
                             "give -o a .pt, .pt2 or .onnx file")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's exporters raise many types
        raise InputError(f"cannot write the pruned model as {suffix}: {first_line(exc)}; try another format "
                         "(.pt always works)") from exc
    return buffer.getvalue()


def compiled_to_onnx(module: Any, batch: Any) -> bytes:
    """A TorchScript module (through the TorchScript exporter) or a torch.export graph (through the dynamo
    exporter) as the bytes of an ONNX file: with any batch size, or the graph's own where it is fixed."""
    example = input_caster(module, [])(to_device(batch.inputs, _CPU))
    if isinstance(example, dict):
        raise UsageError("reluscope prune cannot export a compiled model that takes named inputs; prune the PyTorch "
                         "model it came from")
    args = tuple(example)
    try:
        if not isinstance(module, torch.jit.ScriptModule):
            fixed = fixed_batch_size(module)
            if fixed is None:
                return _onnx_bytes(module, args, {}, _any_batch(args, {}))
            return _onnx_bytes(module, tuple(_rows(a, fixed) for a in args), {}, None)
        import warnings

        names = [f"input_{i}" for i in range(len(args))]
        with tempfile.TemporaryDirectory(prefix="reluscope-") as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(folder) / "model.onnx"
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                              dynamic_axes={name: {0: "batch"} for name in names})
            return path.read_bytes()
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        raise InputError(f"cannot export the model to ONNX to prune it: {first_line(exc)}; prune the PyTorch model "
                         "it came from (a state_dict with --arch)") from exc


def _rows(tensor: Any, count: int) -> Any:
    """`count` rows of a batched input (repeated when it has fewer): an example for a fixed-batch graph."""
    if not isinstance(tensor, torch.Tensor) or not tensor.dim():
        return tensor
    while len(tensor) < count:
        tensor = torch.cat([tensor, tensor])
    return tensor[:count]


def _onnx_bytes(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any) -> bytes:
    import logging
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="reluscope-") as folder, warnings.catch_warnings(), torch_export_logs():
        warnings.simplefilter("ignore")
        path = Path(folder) / "pruned.onnx"
        torch.onnx.export(module, args, str(path), kwargs=kwargs or None, dynamo=True, external_data=False,
                          verbose=False, dynamic_shapes=dynamic_shapes)
        return path.read_bytes()
