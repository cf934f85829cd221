"""reluscope prune on ONNX graphs: decide which dead units can go, fold what they fed into the next
layers' biases, remove them from a copy, and verify the outputs with onnxruntime.

A unit goes only when it can go everywhere its channel reaches (its space, see channels.py):
dead at every hard-zero site of the space, and constant at every layer that reads the space,
so that its constant contribution can be folded into that layer's bias. The result is checked
against the original on the calibration batches. Spaces whose removal is exact by construction
go in together (a miss fails the prune); a space folding a constant into a zero-padded Conv,
or removing rarely active units, is added on top one at a time and stays when it misses the
tolerance (the same policy as the PyTorch backend).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ...errors import InputError, ModelRunError, UsageError, first_line
from ...measure.outputs import OutputCheck, compare
from ...measure.sites import resolve_unit_axis
from ..base import LoadedModel, PruneRequest, Pruning
from .channels import ChannelGraph, Segment, attribute, describe
from .graph import OnnxSite, default_opset, find_sites, infer_shapes, inline_constant_ifs, true_inputs
from .removal import Fold, RemovalError, remove_units, unit_features
from .session import fixed_batch_chunks, graph_feeds, open_session, working_copy

if TYPE_CHECKING:
    from ...data import Batch

CPU = ["CPUExecutionProvider"]


# running ------------------------------------------------------------------
class Runner:
    """The calibration batches as onnxruntime feeds, run through any version of one graph on the CPU."""

    def __init__(self, model: onnx.ModelProto, batches: list[Batch]) -> None:
        self.warnings: list[str] = []
        inputs = true_inputs(model.graph)
        self.batches = [(list(fixed_batch_chunks(graph_feeds(batch.inputs, inputs, self._warn), inputs)), batch.size)
                        for batch in batches]

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def chunks(self, model: onnx.ModelProto, names: list[str] | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(batch index, the real rows of `names`, or of the graph's outputs) for each chunk fed."""
        session = open_session(model, CPU)
        names = names or [value.name for value in model.graph.output]
        for index, (chunks, _) in enumerate(self.batches):
            for feed, real, fed in chunks:
                try:
                    arrays = session.run(names, feed)
                except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for every run failure
                    raise ModelRunError(f"onnxruntime failed to run the ONNX model on the calibration data: "
                                        f"{first_line(exc)}; check that the data fits the model's inputs") from exc
                yield index, [a[:real] if real != fed and a.ndim and len(a) == fed else a for a in arrays]

    def outputs(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        """Per batch, the graph's outputs (chunks joined)."""
        joined: list[list[list[np.ndarray]]] = [[] for _ in self.batches]
        for index, arrays in self.chunks(model):
            joined[index].append(arrays)
        return [[np.concatenate(parts) if len(runs) > 1 else parts[0] for parts in zip(*runs)] for runs in joined]

    def check(self, reference: list[list[np.ndarray]], model: onnx.ModelProto) -> OutputCheck:
        return compare((ref, new, size) for ref, new, (_, size) in zip(reference, self.outputs(model), self.batches))


def channel_ranges(runner: Runner, model: onnx.ModelProto, tensors: dict[str, int]) -> dict[str, tuple]:
    """Per tensor (name -> channel axis): (min, max, mean) per channel over every sample and position."""
    if not tensors:
        return {}
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {value.name for value in extended.graph.output}
    extended.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in present)
    names = list(tensors)
    ranges: dict[str, tuple] = {}
    for _, arrays in runner.chunks(extended, names):
        for name, array in zip(names, arrays):
            if array.size == 0:
                continue
            axis = tensors[name]
            others = tuple(a for a in range(array.ndim) if a != axis)
            low, high = array.min(axis=others), array.max(axis=others)
            total, count = array.sum(axis=others, dtype=np.float64), array.size // array.shape[axis]
            if name in ranges:
                low, high = np.minimum(ranges[name][0], low), np.maximum(ranges[name][1], high)
                total, count = ranges[name][2] + total, ranges[name][3] + count
            ranges[name] = (low, high, total, count)
    return {name: (low, high, total / max(count, 1)) for name, (low, high, total, count) in ranges.items()}


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where dynamic), from shape inference on a copy without large weights."""
    skeleton = infer_shapes(model) or model  # without inference: what the file declares
    graph = skeleton.graph
    return {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            for value in [*graph.input, *graph.value_info, *graph.output] if value.type.tensor_type.HasField("shape")}


# deciding -----------------------------------------------------------------
@dataclass
class _Ledger:
    """What happens to each site's units: kept reasons, and each space's removable units and folds."""

    kept: dict[str, dict[int, str]] = field(default_factory=dict)
    removable: dict[int, list[int]] = field(default_factory=dict)  # space root -> units
    folds: dict[int, list[Fold]] = field(default_factory=dict)  # space root -> folds of its removable units
    padded: dict[int, str] = field(default_factory=dict)  # space root -> a padded Conv its folds are inexact at
    rarely_active: set[int] = field(default_factory=set)  # space roots removing units that are not dead
    members: dict[int, list[tuple[OnnxSite, Segment]]] = field(default_factory=dict)  # space root -> sites
    candidates: dict[str, list[int]] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)  # space roots that hold candidates

    def keep(self, site: str, unit: int, reason: str) -> None:
        self.kept.setdefault(site, {}).setdefault(unit, reason)

    def keep_space(self, root: int, units: list[int], reason: str) -> None:
        """Space units `units` stay: every candidate site unit they cover is kept with `reason`."""
        for site, segment in self.members.get(root, []):
            features = set(unit_features(segment.start, segment.stride, units))
            for unit in self.candidates.get(site.name, []):
                if unit in features:
                    self.keep(site.name, unit, reason)


def _site_segment(segments: list[Segment], unit: int) -> tuple[Segment, int] | None:
    for segment in segments:
        if segment.start <= unit < segment.start + segment.width * segment.stride:
            return segment, (unit - segment.start) // segment.stride
    return None


def _decide(channels: ChannelGraph, sites: list[OnnxSite], candidates: dict[str, list[int]]) -> _Ledger:
    """Which space units every coupled site allows to remove; reasons for the candidates that stay."""
    ledger = _Ledger(candidates=candidates)
    traced: dict[str, OnnxSite] = {}
    for site in sites:
        segments = channels.segments.get(site.tensor) if site.branch is None else None
        rank = len(channels.shapes.get(site.tensor) or []) or None
        if segments is None:
            for unit in candidates.get(site.name, []):
                ledger.keep(site.name, unit, "reluscope cannot trace its channels to a layer it can slice")
            continue
        if rank is None or 1 + resolve_unit_axis(rank - 1, site.layout, None) != channels.axis[site.tensor]:
            for unit in candidates.get(site.name, []):
                ledger.keep(site.name, unit, "its units are not on the channel axis of the layer that writes them")
            continue
        traced[site.name] = site
        for segment in segments:
            ledger.members.setdefault(channels.find(segment.space), []).append((site, segment))
    # the spaces candidates lie in
    wanted: dict[int, set[int]] = {}
    for name, units in candidates.items():
        site = traced.get(name)
        if site is None:
            continue
        for unit in units:
            found = _site_segment(channels.segments[site.tensor], unit)
            if found is None:
                ledger.keep(name, unit, f"no such unit (the site has {channels.features(site.tensor)})")
                continue
            wanted.setdefault(channels.find(found[0].space), set()).add(found[1])
    ledger.touched = set(wanted)
    for root, units in wanted.items():
        space = channels.spaces[root]
        if space.blocked:
            ledger.keep_space(root, sorted(units), "; ".join(space.blocked))
            continue
        removable = []
        for unit in sorted(units):
            reason = _coupling_reason(ledger.members[root], unit, candidates)
            if reason is None:
                removable.append(unit)
            else:
                ledger.keep_space(root, [unit], reason)
        ledger.removable[root] = removable
    return ledger


def _coupling_reason(members: list[tuple[OnnxSite, Segment]], unit: int, candidates: dict[str, list[int]]) -> str | None:
    for site, segment in members:
        if not site.activation.hard_zero:
            return f"coupled site {site.name} is not a hard-zero activation"
    for site, segment in members:
        if site.name not in candidates:
            return f"coupled site {site.name} is not pruned (left out by --sites)"
        dead = set(candidates.get(site.name, []))
        if not set(unit_features(segment.start, segment.stride, [unit])) <= dead:
            return f"active at coupled site {site.name}"
    return None


def _rare_in_space(ledger: _Ledger, root: int, unit: int, rare: dict[str, list[int]]) -> bool:
    """Whether space unit `unit` is a rarely active (not dead) candidate at one of the space's sites."""
    return any(set(unit_features(segment.start, segment.stride, [unit])) & set(rare.get(site.name, ()))
               for site, segment in ledger.members.get(root, []))


def _fold_constants(channels: ChannelGraph, ledger: _Ledger, runner: Runner, model: onnx.ModelProto,
                    rare: dict[str, list[int]]) -> None:
    """Measure what each removable unit feeds its space's consumers; a dead unit that feeds any of them a
    varying value stays, the others get their folds. A rarely active unit (`rare`, not exact) folds its
    mean instead, and its space is applied only if the verification holds."""
    graph = model.graph
    inputs = {}
    for root, units in ledger.removable.items():
        for consumer in channels.spaces[root].consumers:
            if units:
                inputs[consumer.tensor] = 1 if consumer.kind == "conv" else channels.axis[consumer.tensor]
    ranges = channel_ranges(runner, model, inputs)
    producers = {out: node for node in graph.node for out in node.output}
    for root, units in ledger.removable.items():
        folds, varying = [], set()
        for consumer in channels.spaces[root].consumers:
            node = graph.node[consumer.node]
            low, high, mean = ranges[consumer.tensor]
            for unit in units:
                features = unit_features(consumer.start, consumer.stride, [unit])
                if _rare_in_space(ledger, root, unit, rare):
                    ledger.rarely_active.add(root)
                    folds.append(Fold(consumer, unit, np.asarray(mean[features])))
                    continue
                if not np.array_equal(low[features], high[features]):
                    if unit not in varying:
                        source = producers.get(consumer.tensor)
                        through = describe(source) if source is not None else f"the graph input {consumer.tensor!r}"
                        ledger.keep_space(root, [unit], f"feeds {describe(node)} through {through} with a varying value")
                        varying.add(unit)
                    continue
                values = np.asarray(low[features])
                if np.any(values != 0):
                    folds.append(Fold(consumer, unit, values))
                    if consumer.kind == "conv" and _padded(node):
                        ledger.padded.setdefault(root, node.name or node.output[0])
        ledger.removable[root] = [unit for unit in units if unit not in varying]
        ledger.folds[root] = [fold for fold in folds if fold.unit not in varying]


def _padded(node: onnx.NodeProto) -> bool:
    auto = attribute(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    return auto not in ("NOTSET", "VALID") or any(attribute(node, "pads", []) or [])


# applying -----------------------------------------------------------------
def _build(base: onnx.ModelProto, channels: ChannelGraph, ledger: _Ledger, roots: list[int]) -> onnx.ModelProto:
    """The pruned copy with the removable units of `roots`; RemovalError when it is no valid graph."""
    removal = {root: ledger.removable[root] for root in roots}
    folds = [fold for root in roots for fold in ledger.folds.get(root, [])]
    try:
        pruned = remove_units(base, channels, removal, folds)
        pruned = onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
        onnx.checker.check_model(pruned)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError, KeyError,
            IndexError) as exc:
        raise RemovalError(f"the pruned graph is not valid ONNX ({first_line(exc)})") from exc
    return pruned


def _try(base: onnx.ModelProto, channels: ChannelGraph, ledger: _Ledger, roots: list[int], runner: Runner,
         reference: list[list[np.ndarray]]) -> tuple[onnx.ModelProto, OutputCheck]:
    pruned = _build(base, channels, ledger, roots)
    try:
        return pruned, runner.check(reference, pruned)
    except (InputError, ModelRunError) as exc:  # onnxruntime refused to load or run the pruned graph
        raise RemovalError(f"onnxruntime cannot run the pruned graph ({exc})") from exc


def prune_onnx(loaded: LoadedModel, request: PruneRequest) -> Pruning:
    if not request.batches:
        raise UsageError("reluscope prune needs calibration data to verify the pruned model; give --data")
    base, weights_folder = working_copy(loaded.module, loaded.path)
    if weights_folder is not None:
        raise UsageError("reluscope prune cannot prune an ONNX model over 2 GB (protobuf's limit for one file); "
                         "prune the PyTorch model instead")
    inline_constant_ifs(base.graph, default_opset(base))
    named = onnx.ModelProto()
    named.CopyFrom(base)
    sites, _ = find_sites(named)  # on a copy: it exposes If branches by changing the graph
    known = {site.name for site in sites}
    unknown = [name for name in request.candidates if name not in known]
    if unknown:
        raise InputError(f"the ONNX model has no site {unknown[0]!r}"
                         f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; take the candidates "
                         "from a report of this model")
    runner = Runner(base, request.batches)
    reference = runner.outputs(base)
    candidates = {name: sorted(set(int(u) for u in units)) for name, units in request.candidates.items()}
    unchanged = onnx.ModelProto()
    unchanged.CopyFrom(loaded.module)
    if not any(candidates.values()):
        return Pruning(model=unchanged, removed={}, kept={}, check=compare((r, r, s) for r, (_, s) in
                                                                             zip(reference, runner.batches)),
                       notes=list(runner.warnings))
    try:
        channels = ChannelGraph(base, inferred_shapes(base))
        ledger = _decide(channels, sites, candidates)
        _fold_constants(channels, ledger, runner, base, request.rarely_active)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise InputError(f"reluscope cannot read the channels of this ONNX graph ({first_line(exc)}); check it with "
                         "onnx.checker or re-export it") from exc
    notes = list(runner.warnings)
    roots = [root for root, units in ledger.removable.items() if units]
    # exact spaces go in together: a miss there means the graph was not read right, and the prune fails;
    # the others (a fold at a padded Conv, rarely active units) one at a time, each only if it keeps the tolerance
    sure = [root for root in roots if root not in ledger.padded and root not in ledger.rarely_active]
    model, check, applied = unchanged, None, []
    try:
        model, check = _try(base, channels, ledger, sure, runner, reference) if sure else (unchanged, None)
        applied = list(sure)
    except RemovalError as exc:
        for root in sure:
            ledger.keep_space(root, ledger.removable[root], str(exc))
    if check is None:
        check = compare((r, r, s) for r, (_, s) in zip(reference, runner.batches))
    if check.passed(request.tolerance):
        tentative = [root for root in roots if root not in sure]
        model, check, applied = _one_at_a_time(base, channels, ledger, tentative, runner, reference,
                                               request.tolerance, model, check, applied)
    notes.extend(f"the constants folded into the padded convolution {ledger.padded[root]} are exact only away from "
                 "its borders; the outputs were verified within the tolerance" for root in applied if root in ledger.padded)
    return Pruning(model=model, removed=_removed(ledger, applied), kept=_kept(ledger, applied), check=check,
                   notes=notes)


def _one_at_a_time(base: onnx.ModelProto, channels: ChannelGraph, ledger: _Ledger, roots: list[int], runner: Runner,
                   reference: list[list[np.ndarray]], tolerance: float, model: onnx.ModelProto, check: OutputCheck,
                   applied: list[int]) -> tuple[onnx.ModelProto, OutputCheck, list[int]]:
    """Add the spaces `roots` in turn on top of `applied`, each only if the outputs stay within `tolerance`;
    (model, check, spaces applied)."""
    for root in roots:
        try:
            candidate, result = _try(base, channels, ledger, applied + [root], runner, reference)
        except RemovalError as exc:
            ledger.keep_space(root, ledger.removable[root], str(exc))
            continue
        if result.passed(tolerance):
            model, check, applied = candidate, result, applied + [root]
            continue
        figure = result.mismatch or f"relative output difference {result.relative:.3g}"
        if root in ledger.padded:
            reason = (f"a constant folded into the zero-padded convolution {ledger.padded[root]} is not exact at its "
                      f"borders ({figure}, above the tolerance {tolerance:g})")
        else:
            reason = f"not dead, and removing it moves the outputs too far ({figure}, above the tolerance {tolerance:g})"
        ledger.keep_space(root, ledger.removable[root], reason)
    return model, check, applied


def _removed(ledger: _Ledger, applied: list[int]) -> dict[str, list[int]]:
    """Site -> its removed units (original indices), for every site with candidates or coupled to them."""
    removed: dict[str, list[int]] = {name: [] for name in ledger.candidates}
    for root in ledger.touched:
        for site, segment in ledger.members.get(root, []):
            units = unit_features(segment.start, segment.stride, ledger.removable[root]) if root in applied else []
            removed.setdefault(site.name, []).extend(units)
    return {name: sorted(set(units)) for name, units in removed.items()}


def _kept(ledger: _Ledger, applied: list[int]) -> dict[str, dict[int, str]]:
    kept = {name: dict(sorted(units.items())) for name, units in ledger.kept.items()}
    for root in ledger.touched:
        for site, _ in ledger.members.get(root, []):
            kept.setdefault(site.name, {})
    return kept
