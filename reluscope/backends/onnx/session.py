"""onnxruntime capture: run the ONNX graph users deploy, with each site's statistics reduced inside it.

The graph is extended so that onnxruntime itself reduces every site's tensor per sample
(active counts and sums per unit, min and max) and returns only those small arrays. Copying
every site tensor into numpy and reducing it there cost more than the inference itself on a
CPU (about 1.5x of plain inference against 1.2x), and reallocating those big outputs each
batch stalls on page faults.

Every site tensor is also a graph output, fetched for the exact route (`SiteStats.update`):
  * in the first run, one row per site, from which the recorder creates the site;
  * for sites the graph does not reduce: unknown rank or dtype, 2-D outputs (as small as
    their reductions), or every site when percentiles are asked for (the histogram needs
    every value);
  * for a batch whose reductions are not exact: NaN/Inf (the exact route counts them and
    keeps them out of min/max), or per-unit counts past float32's exact integers.
Nothing is kept between batches, so memory does not grow with their number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ...errors import InputError, UsageError, first_line
from ...measure.recorder import SiteRecorder
from ...measure.sites import resolve_unit_axis
from ...data import is_tensor
from ...measure.stats import SiteStats
from ..base import Session
from .graph import (_NEVER_RAN, OnnxSite, default_opset, find_sites, free_prefix, infer_shapes, inline_functions,
                    true_inputs)

# ORT_ENABLE_ALL: what deployed sessions run, and the fastest level (benchmarks/README.md).
# No optimization can hide a site: each site tensor is a graph output, which onnxruntime must produce.
OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
PROTOBUF_LIMIT = 2**31 - 1  # protobuf serializes no message past 2 GiB: bigger models keep weights in side files
_EXACT_COUNT = 2**24  # float32 holds every integer below this, so per-unit counts summed as floats stay exact
_PREFIX = "reluscope::"  # the names of the nodes reluscope adds start with it, or with a numbered one (free_prefix)
Rows = Callable[..., np.ndarray]  # (output name, start=0, stop=None) -> that output's real rows


@dataclass(frozen=True)
class _Reduced:
    """Output names of one site's in-graph reductions; all but `shape` keep the leading axis."""

    shape: str  # Shape(y)
    unit_axis: int  # in the batched tensor
    active: str  # [rows, units] float counts of active elements
    total: str  # [rows, units] sums
    squares: str  # [rows, units] sums of squares
    low: str  # [rows] minima
    high: str  # [rows] maxima
    abs_total: str | None  # [rows, units] sums of |y|, for the dormant score
    saturated: str | None  # [rows, units] counts of y >= upper

    def outputs(self) -> list[str]:
        names = (self.shape, self.active, self.total, self.squares, self.low, self.high, self.abs_total,
                 self.saturated)
        return [name for name in names if name is not None]


@dataclass(frozen=True)
class _Plan:
    site: OnnxSite
    raw: tuple[str, ...]  # what the exact route reads: the output, and the input for PReLU
    reduced: _Reduced | None  # None: the exact route in every run


class _Builder:
    """Appends nodes to a graph in its own opset (reduction axes became inputs in opsets 13 and 18)."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self._count = 0
        self._constants: dict[tuple[Any, ...], str] = {}
        self._prefix = free_prefix(graph, _PREFIX)  # no name of the model's starts with it: none collides

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        self._count += 1
        out = f"{self._prefix}{self._count}"
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def constant(self, value: np.ndarray) -> str:
        # Constant nodes, not initializers: IR < 4 requires every initializer to be a graph input too
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._constants:
            self._constants[key] = self.node("Constant", [], value=numpy_helper.from_array(value))
        return self._constants[key]

    def reduce(self, op: str, x: str, axes: list[int]) -> str:
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(op, [x, self.constant(np.array(axes, dtype=np.int64))], keepdims=0)
        return self.node(op, [x], axes=axes, keepdims=0)

    def count(self, mask: str, axes: list[int]) -> str:
        return self.reduce("ReduceSum", self.node("Cast", [mask], to=TensorProto.FLOAT), axes)


def _reduce_site(site: OnnxSite, rank: int, unit_axis: int, build: _Builder) -> _Reduced:
    """The per-sample reductions SiteStats.update needs, as nodes of the graph."""
    y = site.tensor
    others = [axis for axis in range(1, rank) if axis != unit_axis]
    everything = list(range(1, rank))
    zero = build.constant(np.array(0, dtype=np.float32))
    upper = site.activation.upper
    saturated = None
    if upper is not None:  # Not(Less) rather than GreaterOrEqual, which needs opset 12
        below = build.node("Less", [y, build.constant(np.array(upper, dtype=np.float32))])
        saturated = build.count(build.node("Not", [below]), others)
    return _Reduced(
        shape=build.node("Shape", [y]),
        unit_axis=unit_axis,
        active=build.count(build.node("Greater", [site.input if site.activation.active_from_input else y, zero]),
                           others),
        total=build.reduce("ReduceSum", y, others),
        squares=build.reduce("ReduceSumSquare", y, others),
        low=build.reduce("ReduceMin", y, everything),
        high=build.reduce("ReduceMax", y, everything),
        abs_total=build.reduce("ReduceL1", y, others) if site.activation.has_dormant_score else None,
        saturated=saturated,
    )


def _tensor_types(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, tuple[int, int | None]]:
    """Element type and rank of `names`, from the file's value_info or else from shape inference."""

    def known(m: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
        graph = m.graph
        return {v.name: (v.type.tensor_type.elem_type,
                         len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None)
                for v in chain(graph.input, graph.value_info, graph.output)}

    types = known(model)
    if all(types.get(name, (0, None))[1] is not None for name in names):
        return types  # exporters such as torch.onnx's dynamo path record every tensor's type
    inferred = infer_shapes(model)
    return types if inferred is None else known(inferred)


def _extend(model: onnx.ModelProto, sites: list[OnnxSite], recorder: SiteRecorder) -> list[_Plan]:
    """Add each site's reductions to the graph and make every tensor a plan reads a graph output."""
    graph = model.graph
    reduce = not recorder.percentiles  # the streaming histogram needs every value
    types = _tensor_types(model, [site.tensor for site in sites if site.branch is None]) if reduce and sites else {}
    build = _Builder(graph, default_opset(model))
    plans = []
    for site in sites:
        raw = (site.fetch, site.fetch_input) if site.activation.active_from_input else (site.fetch,)
        elem, rank = types.get(site.tensor, (TensorProto.UNDEFINED, None))
        reduced = None
        # a site inside an If branch comes out whole: when the branch does not run, its output is an empty stand-in
        if site.branch is None and elem == TensorProto.FLOAT and rank is not None and rank >= 3:
            unit_axis = 1 + resolve_unit_axis(rank - 1, site.layout, recorder.unit_axis_override)
            reduced = _reduce_site(site, rank, unit_axis, build)
        plans.append(_Plan(site, raw, reduced))
    present = {value.name for value in graph.output}
    for plan in plans:
        for name in (*plan.raw, *(plan.reduced.outputs() if plan.reduced else ())):
            if name not in present:
                graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    return plans


def providers_for(device: str) -> list[Any]:
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UsageError(f"--device {device}: onnxruntime's CUDA execution provider is not installed "
                         "(pip install onnxruntime-gpu); use --device cpu")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def working_copy(model: onnx.ModelProto, path: str | None) -> tuple[onnx.ModelProto, str | None]:
    """A copy to extend, and the folder of its weights when they stay on disk."""
    # Summing tensor sizes is much cheaper than ModelProto.ByteSize() on a model with its weights.
    if sum(tensor.ByteSize() for tensor in model.graph.initializer) > PROTOBUF_LIMIT:
        if path is None:
            raise UsageError("an ONNX model over 2 GB can only be analysed from its file path")
        # Past protobuf's limit the graph is serialized without weights; onnxruntime reads them from the folder
        return inline_functions(onnx.load(path, load_external_data=False)), str(Path(path).resolve().parent)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return inline_functions(copy), None


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Declared shape: ints for fixed dimensions, names (or '?') for dynamic ones; None when undeclared."""
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _to_numpy(value: Any) -> np.ndarray:
    """A batch's array as onnxruntime takes it; a torch tensor (given through the API) is copied to the host."""
    if is_tensor(value):
        import torch

        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def _beyond_range(array: np.ndarray, want: np.dtype) -> float | None:
    """The largest finite magnitude in `array` when it is beyond what floating dtype `want` holds (cast,
    it would become inf), else None; checked only where the data's dtype can hold such values."""
    if want.kind != "f" or array.dtype.kind not in "fiu" or array.size == 0:
        return None
    source = float(np.finfo(array.dtype).max if array.dtype.kind == "f" else np.iinfo(array.dtype).max)
    limit = float(np.finfo(want).max)
    if source <= limit:
        return None
    # fmax/fmin skip NaN and allocate nothing: the usual batch (every value fits) stops here
    if max(float(np.fmax.reduce(array, axis=None)), -float(np.fmin.reduce(array, axis=None))) <= limit:
        return None
    magnitude = np.abs(array.astype(np.float64, copy=False))
    largest = float(np.max(magnitude, initial=0.0, where=np.isfinite(magnitude)))
    return largest if largest > limit else None


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def open_session(model: onnx.ModelProto, providers: list[Any], weights_folder: str | None = None
                 ) -> ort.InferenceSession:
    """An onnxruntime session of `model` (its weights read from `weights_folder` where they stay on disk);
    a model onnxruntime cannot load is an InputError."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION
    options.log_severity_level = 4  # failures come back as exceptions; stderr stays ours
    # Idle onnxruntime threads spin for a while after each run and starve the torch/numpy work that
    # follows (benchmarks/README.md has the figures).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if weights_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weights_folder)
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for every load failure
        raise InputError(f"onnxruntime cannot load the model: {first_line(exc)}; "
                         "check that the installed onnxruntime supports its opset and operators") from exc


def graph_feeds(inputs: tuple[Any, ...] | dict[str, Any], graph_inputs: list[onnx.ValueInfoProto],
                warn: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Name -> array for the graph's true inputs (`true_inputs`), checked against and cast to what it
    declares; `warn` hears about casts."""
    names = [value.name for value in graph_inputs]
    if isinstance(inputs, dict):
        if sorted(inputs) != sorted(names):
            raise InputError(f"the ONNX graph takes inputs {names}, the data gives {list(inputs)}; name the data's "
                             "arrays after the graph's inputs")
        given = [inputs[name] for name in names]
    else:
        if len(inputs) != len(names):
            raise InputError(f"the ONNX graph takes {len(names)} input(s) {names}, the "
                             f"data gives {len(inputs)}; pass one array per graph input")
        given = list(inputs)
    feeds = {}
    for value, data in zip(graph_inputs, given):
        array = _to_numpy(data)
        dims = _dims(value)
        if dims is not None and (array.ndim != len(dims) or any(
                isinstance(d, int) and d != n for d, n in zip(dims[1:], array.shape[1:]))):
            expected = "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"
            raise InputError(f"ONNX input {value.name!r} expects shape {expected}, the data has "
                             f"{tuple(array.shape)}; give data of the model's input shape")
        want = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if array.dtype != want:
            largest = _beyond_range(array, want)
            if largest is not None:
                warn(f"ONNX input {value.name!r} takes {want}; the data ({array.dtype}) holds values beyond "
                     f"its range (largest magnitude {largest:.3g}): cast, they become inf")
            if not (array.dtype == np.float64 and want == np.float32):  # numpy default, the usual graph: no news
                warn(f"ONNX input {value.name!r} takes {want}, the data is {array.dtype}: cast")
            with np.errstate(over="ignore", invalid="ignore"):
                array = array.astype(want)
        feeds[value.name] = array
    return feeds


def fixed_batch_chunks(feeds: dict[str, np.ndarray], graph_inputs: list[onnx.ValueInfoProto]
                       ) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
    """(feed, real rows, rows fed): the whole batch, or chunks of the graph's fixed batch size with
    the last one zero-padded."""
    # rows from the first input with a batch axis (a scalar input, such as a sample rate, has none)
    batched = [(value, feeds[value.name]) for value in graph_inputs if feeds[value.name].ndim]
    rows = len(batched[0][1]) if batched else 0
    dims = _dims(batched[0][0]) if batched else None
    fixed = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    if fixed is None or rows == fixed:
        yield feeds, rows, rows
        return
    for start in range(0, rows, fixed):
        real = min(fixed, rows - start)
        chunk = {}
        for name, array in feeds.items():
            if not array.ndim:
                chunk[name] = array
                continue
            part = array[start:start + fixed]
            if real < fixed:
                part = np.concatenate([part, np.zeros((fixed - real, *part.shape[1:]), dtype=part.dtype)])
            chunk[name] = part
        yield chunk, real, fixed


class OnnxCapture(Session):
    """Context manager: while active, `run(inputs)` feeds every site of the graph into `recorder`."""

    def __init__(self, model: onnx.ModelProto, recorder: SiteRecorder, device: str = "cpu",
                 path: str | None = None) -> None:
        self.recorder = recorder
        self.warnings: list[str] = []
        self._providers = providers_for(device)
        self._model, self._weights_folder = working_copy(model, path)
        sites, self.unanalysed = find_sites(self._model)
        self._inputs = true_inputs(self._model.graph)
        self.input_names = [value.name for value in self._inputs]
        self._plans = _extend(self._model, sites, recorder)
        # every run fetches the reductions (a site's tensor where it has none); the first also every site tensor
        self._fast = _unique(chain.from_iterable(
            plan.reduced.outputs() if plan.reduced else plan.raw for plan in self._plans))
        self._first = _unique(chain(self._fast, chain.from_iterable(plan.raw for plan in self._plans)))
        self._session: ort.InferenceSession | None = None
        self._stats: list[SiteStats | None] | None = None  # per plan, once the first run has created the sites
        self._warned: set[str] = set()

    # lifecycle -------------------------------------------------------------
    def __enter__(self) -> OnnxCapture:
        self._session = open_session(self._model, self._providers, self._weights_folder)
        self._model = None  # the session holds the weights now
        return self

    def __exit__(self, *exc: object) -> None:
        self._session = None

    # inputs ----------------------------------------------------------------
    def _feeds(self, inputs: tuple[Any, ...] | dict[str, Any]) -> dict[str, np.ndarray]:
        return graph_feeds(inputs, self._inputs, self._warn)

    def _chunks(self, feeds: dict[str, np.ndarray]) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
        return fixed_batch_chunks(feeds, self._inputs)

    # running ---------------------------------------------------------------
    def run(self, inputs: tuple[Any, ...] | dict[str, Any]) -> None:
        if self._session is None:
            raise RuntimeError("OnnxCapture.run() outside its `with` block")
        feeds = self._feeds(inputs)
        if self._plans:
            for feed, real, fed in self._chunks(feeds):
                self._run_once(feed, real, fed)

    def _run_once(self, feed: dict[str, np.ndarray], real: int, fed: int) -> None:
        first = self._stats is None
        fetched = self._fetch(feed, self._first if first else self._fast)
        rows = [partial(self._rows, fetched, real, fed, plan.site) for plan in self._plans]
        created = self._create_sites(rows, fetched)
        folds = [plan.reduced is not None
                 and _exact(plan.reduced, fetched[plan.reduced.shape], partial(get, start=1 if index in created else 0))
                 for index, (plan, get) in enumerate(zip(self._plans, rows))]
        again = [plan.raw for plan, fold in zip(self._plans, folds) if plan.reduced is not None and not fold]
        if again and not first:  # run the batch again for those sites' tensors
            fetched.update(self._fetch(feed, _unique(chain.from_iterable(again))))
        for index, (plan, stats, get, fold) in enumerate(zip(self._plans, self._stats, rows, folds)):
            if stats is None or _not_run(plan, fetched):
                continue  # a site in an If branch that has not run yet
            if plan.reduced is not None:
                get = partial(get, start=1 if index in created else 0)  # a reduced site was created from its first row
                if len(get(plan.reduced.low)) == 0:
                    continue  # a one-row first batch: recorded when the site was created
            elif index in created:
                continue  # recorded whole when the site was created
            if fold:
                _fold(stats, plan.reduced, fetched[plan.reduced.shape], get)
            else:
                stats.update(*_tensors(plan, get))

    def _create_sites(self, rows: list[Rows], fetched: dict[str, np.ndarray]) -> set[int]:
        """The recorder names each site and fixes its shape and unit axis, from its tensor (one row of it
        where the graph reduces the rest): every site in the first run, a site inside an If branch in the
        first run its branch runs. Returns the plans created now."""
        if self._stats is None:
            self.recorder.begin_forward()
            self._stats = [None] * len(self._plans)
        created = set()
        for index, (plan, get) in enumerate(zip(self._plans, rows)):
            if self._stats[index] is not None or _not_run(plan, fetched):
                continue
            out, inp = _tensors(plan, get if plan.reduced is None else partial(get, stop=1))
            self._stats[index] = self.recorder.record(plan.site.name, plan.site.activation, out, inp,
                                                      layout=plan.site.layout, tensor=plan.site.tensor,
                                                      module=plan.site.module, node=plan.site.node)
            created.add(index)
        return created

    def never_ran(self) -> list[dict[str, Any]]:
        """Sites inside If branches that no batch ran, each with the reason it is not measured."""
        return [{"name": plan.site.name, "op": plan.site.activation.op,
                 "reason": _NEVER_RAN.format(branch=plan.site.branch), "reached": False}
                for plan, stats in zip(self._plans, self._stats or [None] * len(self._plans)) if stats is None]

    def _fetch(self, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(names, self._session.run(names, feed)))

    def _rows(self, fetched: dict[str, np.ndarray], real: int, fed: int, site: OnnxSite, name: str,
              start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start:stop] of an output, after dropping the zero rows that padded a fixed-size batch."""
        array = fetched[name]
        if real != fed:
            if array.ndim and len(array) == fed:
                array = array[:real]
            else:
                self._warn(f"site {site.name}: its tensor's leading axis is not the batch, so the zero rows that "
                           "pad the last batch to the graph's fixed batch size count in its statistics")
        return array[start:stop]

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.warnings.append(message)


def _tensors(plan: _Plan, get: Rows) -> tuple[np.ndarray, np.ndarray | None]:
    """A site's output (and input, for PReLU) as onnxruntime returned them: numpy arrays, which the
    recorder measures on the host with numpy."""
    out = get(plan.site.fetch)
    inp = get(plan.site.fetch_input) if plan.site.activation.active_from_input else None
    return out, inp


def _not_run(plan: _Plan, fetched: dict[str, np.ndarray]) -> bool:
    """Whether a site inside an If branch was skipped: the other branch ran and gave an empty stand-in."""
    if plan.site.branch is None:
        return False
    value = fetched.get(plan.site.fetch)
    return value is None or (value.ndim == 1 and value.size == 0)


def _exact(reduced: _Reduced, shape: np.ndarray, get: Rows) -> bool:
    """Whether this batch's float32 reductions equal what the exact route computes."""
    per_unit = math.prod(int(d) for d in shape[1:]) // max(int(shape[reduced.unit_axis]), 1)
    if per_unit >= _EXACT_COUNT:
        return False
    # NaN/Inf anywhere makes the sums non-finite (as does overflow: also a case for the exact route)
    return bool(np.isfinite(get(reduced.total)).all() and np.isfinite(get(reduced.squares)).all())


def _fold(stats: SiteStats, reduced: _Reduced, shape: np.ndarray, get: Rows) -> None:
    """Add one batch's in-graph reductions to a site's accumulators (their declared merge operators)."""
    rows = len(get(reduced.low))
    stats.add(
        samples=rows,
        elements=rows * math.prod(int(d) for d in shape[1:]),
        active=get(reduced.active).sum(axis=0, dtype=np.float64).round().astype(np.int64),
        abs_sum=None if reduced.abs_total is None else get(reduced.abs_total).sum(axis=0, dtype=np.float64),
        saturated=0 if reduced.saturated is None else int(get(reduced.saturated).sum(dtype=np.float64)),
        min=float(get(reduced.low).min()),
        max=float(get(reduced.high).max()),
        sum=float(get(reduced.total).sum(dtype=np.float64)),
        sumsq=float(get(reduced.squares).sum(dtype=np.float64)),
    )
