"""The metric catalogue: every field of a report's `layers[]` entries and `summary`, in JSON order.

Each entry says what a field holds (its JSON kind), whether it is per-site or model-wide, whether
`--fail-on` rules and `reluscope diff` list it, and how the table and markdown show it. The report
builder (key order, summary totals), the JSON Schema, the gates, diff and the table/markdown
columns all read this one table. Plain Python: no torch, cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

SITE = "site"
SUMMARY = "summary"

#: JSON kinds. `unit_list`: unit indices (gates and diff count them); `fractions`: one share per unit; `numbers`: an object of
#: named numbers; `object`: an object with the documented `members` (a `$defs` entry of its own).
KINDS = ("name", "text", "shape", "index", "count", "fraction", "number", "nonneg", "unit_list", "fractions", "numbers",
         "object")


@dataclass(frozen=True)
class Metric:
    name: str
    scope: str  # SITE (a field of layers[]) or SUMMARY (a field of summary, or of gradient_flow)
    kind: str
    help: str = ""  # what it means, in one line; empty: not listed among the --fail-on metrics
    required: bool = True
    nullable: bool = False
    description: str | None = None  # for the JSON Schema
    members: tuple["Metric", ...] = ()  # sub-fields of a `numbers`/`object` field, addressed as `field.member`
    changes: bool = False  # a change in it makes a site "changed" in `reluscope diff`
    total: tuple[str, str] | None = None  # summary: (how, site field): count, sum, share (of units), mean
    label: str | None = None  # column header in the table and markdown; None: no column
    cell: str | None = None  # how a column shows it: count, percent, units, measure
    always: bool = True  # column shown for every report; False: only when some site has the field
    alarm: bool = False  # a non-empty value is a problem (the table shows it red, markdown bold)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: unknown kind {self.kind!r}")

    @property
    def gate(self) -> bool:
        return bool(self.help)

    @property
    def is_list(self) -> bool:
        return self.kind == "unit_list"

    @property
    def nested(self) -> bool:
        return self.kind in ("numbers", "object")


def _site(name: str, kind: str, help: str = "", **kw: Any) -> Metric:
    return Metric(name, SITE, kind, help, **kw)


def _summary(name: str, kind: str, help: str, total: tuple[str, str], **kw: Any) -> Metric:
    return Metric(name, SUMMARY, kind, help, total=total, **kw)


SITE_FIELDS: tuple[Metric, ...] = (
    _site("name", "name"),
    _site("op", "name"),
    _site("tensor", "text", required=False, description="ONNX: the site's output tensor."),
    _site("node", "text", required=False,
          description="ONNX: the node computing the site (the last node of a decomposed activation); `name` is "
                      "the PyTorch site name where the exporter recorded the module path, else this."),
    _site("module", "text", required=False,
          description="ONNX: the PyTorch site name, where the exporter recorded the module path."),
    _site("shape", "shape", description="Per-sample shape (batch axis dropped)."),
    _site("unit_axis", "index", description="Index into `shape` of the unit axis."),
    _site("units", "count", "number of units", changes=True, label="units", cell="count"),
    _site("samples", "count", "samples seen"),
    _site("zero_fraction", "fraction", "share of outputs that are not active (0..1)", changes=True,
          label="zero %", cell="percent"),
    _site("dead_units", "unit_list", "number of dead units", changes=True, label="dead", cell="units", alarm=True),
    _site("dead_fraction", "fraction", "share of the site's units that are dead (0..1)"),
    _site("rarely_active_units", "unit_list", "number of rarely active units", changes=True,
          label="rarely active", cell="units"),
    _site("rarely_active_fraction", "fraction",
          "share of units active on fewer than --rare-threshold of outputs (0..1)"),
    _site("dormant_units", "unit_list", "number of tau-dormant units", changes=True, label="dormant", cell="units",
          always=False),
    _site("unit_active_fraction", "fractions", required=False,
          description="Per unit (by index along the unit axis), the share of its outputs that were active, to 4 "
                      "significant digits (0 only for dead units)."),
    _site("min", "number", "smallest finite output", nullable=True, changes=True,
          description="Smallest finite output; null when there was none.", label="min", cell="measure"),
    _site("max", "number", "largest finite output", nullable=True, changes=True,
          description="Largest finite output; null when there was none.", label="max", cell="measure"),
    _site("mean", "number", "mean finite output"),
    _site("std", "nonneg", "standard deviation of the finite outputs"),
    _site("nonfinite", "count", "number of NaN/Inf outputs", changes=True),
    _site("saturated_fraction", "fraction", "share of outputs at the upper bound (bounded ops such as ReLU6 only)",
          nullable=True, changes=True, description="Share at the upper bound; null for unbounded ops.",
          label="sat. %", cell="percent", always=False),
    _site("percentiles", "numbers", required=False,
          description="Output percentiles by name (p1, p50, p99, p99.9), when measured.", members=(
              _site("p1", "number", "1st percentile of the outputs (turns --percentiles on)"),
              _site("p50", "number", "median of the outputs (turns --percentiles on)", label="p50", cell="measure",
                    always=False),
              _site("p99", "number", "99th percentile of the outputs (turns --percentiles on)"),
              _site("p99.9", "number", "99.9th percentile of the outputs (turns --percentiles on)", label="p99.9",
                    cell="measure", always=False),
          )),
    # Added by the backend after build_layer, when --gradients ran.
    _site("gradient", "object", required=False,
          description="Gradient at the site's output (present when --gradients ran).", members=(
              _site("rms", "nonneg", "RMS of the gradient at the site's output (--gradients)", nullable=True,
                    label="grad rms", cell="measure", always=False),
              _site("zero_fraction", "fraction", "share of exactly-zero gradient elements (--gradients)",
                    nullable=True),
          )),
)

SUMMARY_FIELDS: tuple[Metric, ...] = (
    _summary("layers", "count", "number of activation sites", ("count", "")),
    _summary("units", "count", "units in the whole model", ("sum", "units")),
    _summary("dead_units", "count", "dead units in the whole model", ("sum", "dead_units"),
             description="A count (layers[].dead_units are index lists)."),
    _summary("dead_fraction", "fraction", "share of all units that are dead", ("share", "dead_units")),
    _summary("rarely_active_units", "count", "rarely active units in the whole model", ("sum", "rarely_active_units")),
    _summary("rarely_active_fraction", "fraction", "share of all units that are rarely active",
             ("share", "rarely_active_units")),
    _summary("dormant_units", "count", "tau-dormant units in the whole model", ("sum", "dormant_units")),
    _summary("mean_zero_fraction", "fraction", "mean over sites of zero_fraction", ("mean", "zero_fraction")),
    _summary("nonfinite", "count", "NaN/Inf outputs in the whole model", ("sum", "nonfinite")),
)

#: `gradient_flow` (a top-level object of the report, its schema in schema.py): the numbers gates read
#: as model-wide `gradient_flow.X`.
GRADIENT_FLOW = Metric("gradient_flow", SUMMARY, "object", required=False, members=(
    Metric("nonfinite", SUMMARY, "count", "NaN/Inf gradient elements (--gradients)"),
    Metric("first_to_last_ratio", SUMMARY, "nonneg", "first/last weighted layer gradient-norm ratio (--gradients)",
           nullable=True),
    Metric("loss_mean", SUMMARY, "number", "mean loss over the batches (--gradients)", nullable=True),
))

SITE_BY_NAME: dict[str, Metric] = {m.name: m for m in SITE_FIELDS}


def flatten(fields: tuple[Metric, ...]) -> list[tuple[str, Metric]]:
    """(path, metric) for each field and each member of a nested one (`field.member`)."""
    out: list[tuple[str, Metric]] = []
    for metric in fields:
        out.append((metric.name, metric))
        out += [(f"{metric.name}.{member.name}", member) for member in metric.members]
    return out


def gate_metrics(scope: str) -> dict[str, str]:
    """Metric name -> one-line help, for the metrics `--fail-on` lists (nested fields as `field.member`)."""
    fields = SITE_FIELDS if scope == SITE else (*SUMMARY_FIELDS, GRADIENT_FLOW)
    return {name: metric.help for name, metric in flatten(fields) if metric.gate}


def open_prefixes(scope: str) -> tuple[str, ...]:
    """`field.` for each nested field: gates accept any member below it, checked against the report."""
    fields = SITE_FIELDS if scope == SITE else (*SUMMARY_FIELDS, GRADIENT_FLOW)
    return tuple(f"{m.name}." for m in fields if m.nested)


def nested_site_fields() -> tuple[str, ...]:
    return tuple(m.name for m in SITE_FIELDS if m.nested)


def unit_list_fields() -> tuple[str, ...]:
    return tuple(m.name for m in SITE_FIELDS if m.is_list)


def hidden_site_fields() -> frozenset[str]:
    """Numeric site fields that are bookkeeping, not measurements (gates and diff skip them)."""
    return frozenset(m.name for m in SITE_FIELDS if m.kind == "index")


def change_metrics() -> tuple[str, ...]:
    """Per-site metrics whose change makes a site "changed" in a diff (others, such as mean/std, drift
    with any retraining)."""
    return tuple(m.name for m in SITE_FIELDS if m.changes)


def site_metric(path: str) -> Metric:
    """The catalogue entry of a per-site field, `field` or `field.member`; KeyError when there is none."""
    for name, metric in flatten(SITE_FIELDS):
        if name == path:
            return metric
    raise KeyError(path)


def site_value(layer: Mapping[str, Any], path: str) -> Any:
    """The value at `path` (`field` or `field.member`) of one `layers[]` entry; None when absent."""
    head, dot, member = path.partition(".")
    value = layer.get(head)
    if dot:
        return value.get(member) if isinstance(value, Mapping) else None
    return value


def ordered(fields: tuple[Metric, ...], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` in catalogue order. Optional fields appear only when set (not None); a required field
    that is missing is a programming error (KeyError)."""
    out: dict[str, Any] = {}
    for metric in fields:
        if metric.required:
            out[metric.name] = values[metric.name]
        elif values.get(metric.name) is not None:
            out[metric.name] = values[metric.name]
    return out


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, list) else value


def summarise(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The `summary` object: each field's `total` over the sites, in catalogue order."""
    out: dict[str, Any] = {}
    for metric in SUMMARY_FIELDS:
        assert metric.total is not None
        how, of = metric.total
        if how == "count":
            out[metric.name] = len(layers)
        elif how == "sum":
            out[metric.name] = sum(_count(layer[of]) for layer in layers)
        elif how == "share":
            units = out["units"]
            out[metric.name] = out[of] / units if units else 0.0
        elif how == "mean":
            out[metric.name] = sum(layer[of] for layer in layers) / len(layers) if layers else 0.0
        else:
            raise ValueError(f"unknown summary total {how!r} for {metric.name}")
    return out

