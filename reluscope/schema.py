"""JSON Schemas (draft 2020-12) of the report (`reluscope schema`) and of a diff (`reluscope schema --diff`).

Strict about what is there: every documented field has its type, range and required-ness, so a
wrong type or a missing key is rejected. Open about what may come: objects accept extra keys,
because additive changes keep `schema_version` and a dashboard validating with
this schema must not break on them. A breaking change bumps `schema_version`, which the schema
pins with `const`.
"""

from __future__ import annotations

import json
from typing import Any

from .metrics import SITE_FIELDS, SUMMARY_FIELDS, Metric
from .report import SCHEMA_VERSION

DRAFT = "https://json-schema.org/draft/2020-12/schema"
REPORT_ID = f"https://reluscope.dev/schema/report-v{SCHEMA_VERSION}.json"
DIFF_ID = f"https://reluscope.dev/schema/diff-v{SCHEMA_VERSION}.json"
PRUNE_ID = f"https://reluscope.dev/schema/prune-v{SCHEMA_VERSION}.json"

MODEL_FORMATS = ["torch-state-dict", "torchscript", "torch-export", "torch-pickle", "torch-module", "onnx", "huggingface"]


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_COUNT = {"type": "integer", "minimum": 0}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_NUMBER = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_TEXT = {"type": "string"}
_NAME = {"type": "string", "minLength": 1}

_KIND: dict[str, dict[str, Any]] = {
    "name": _NAME,
    "text": _TEXT,
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "index": {"type": "integer", "minimum": 0},
    "count": _COUNT,
    "fraction": _FRACTION,
    "number": _NUMBER,
    "nonneg": _NONNEG,
    "unit_list": {"$ref": "#/$defs/unit_list"},
    "fractions": {"type": "array", "items": _FRACTION},
    "numbers": {"type": "object", "additionalProperties": _NUMBER},
}
def _property(metric: Metric) -> dict[str, Any]:
    """The schema of one catalogue field."""
    if metric.kind == "object":
        return {"$ref": f"#/$defs/{metric.name}"}
    schema = _KIND[metric.kind]
    if metric.nullable:
        schema = _nullable(schema)
    return {"description": metric.description, **schema} if metric.description else schema


def _object(fields: tuple[Metric, ...], description: str | None = None) -> dict[str, Any]:
    """An object schema: every catalogue field its property, the required ones listed."""
    return {
        **({"description": description} if description else {}),
        "type": "object",
        "required": [m.name for m in fields if m.required],
        "properties": {m.name: _property(m) for m in fields},
    }


def _nested_defs(fields: tuple[Metric, ...]) -> dict[str, Any]:
    """A `$defs` entry for each `object` field, from its members."""
    return {m.name: _object(m.members, m.description) for m in fields if m.kind == "object"}


_DEFS: dict[str, Any] = {
    "count": _COUNT,
    "fraction": _FRACTION,
    "unit_list": {
        "description": "Unit indices along the site's unit axis.",
        "type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True,
    },
    "gate": {
        "description": "One --fail-on rule and its verdict. `value`: the model-wide value, or the worst "
                       "(offending) site's value; null when nothing could be evaluated.",
        "type": "object",
        "required": ["rule", "passed", "offenders"],
        "properties": {
            "rule": _NAME,
            "passed": {"type": "boolean"},
            "offenders": {"type": "array", "items": _NAME},
            "value": _nullable(_NUMBER),
        },
    },
    **_nested_defs(SITE_FIELDS),
    "layer": _object(SITE_FIELDS, "One activation site: one call of a ReLU-family activation."),
    "summary": _object(SUMMARY_FIELDS),
    "parameter_gradient": {
        "type": "object",
        "required": ["name", "grad_norm", "weight_norm", "ratio"],
        "properties": {
            "name": _NAME,
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "grad_norm": _nullable(_NONNEG),
            "weight_norm": _nullable(_NONNEG),
            "ratio": _nullable(_NONNEG),
        },
    },
    "gradient_flow": {
        "description": "Gradient flow (present when --gradients ran). `available: false` with a `reason` "
                       "when it could not be measured (e.g. ONNX models).",
        "type": "object",
        "properties": {
            "available": {"type": "boolean"},
            "reason": _TEXT,
            "loss": _nullable(_TEXT),
            "loss_mean": _nullable(_NUMBER),
            "batches": _COUNT,
            "verdict": {"enum": ["ok", "vanishing", "exploding"]},
            "first_layer": _nullable(_TEXT),
            "last_layer": _nullable(_TEXT),
            "first_to_last_ratio": _nullable(_NONNEG),
            "thresholds": {"type": "object", "additionalProperties": _NUMBER},
            "nonfinite": _COUNT,
            "parameters": {"type": "array", "items": {"$ref": "#/$defs/parameter_gradient"}},
        },
        "if": {"required": ["available"], "properties": {"available": {"const": False}}},
        "then": {"required": ["available", "reason"]},
        "else": {"required": ["loss", "verdict", "nonfinite", "parameters"]},
    },
}


def report_schema() -> dict[str, Any]:
    """The JSON Schema of `reluscope analyze -f json` reports."""
    return {
        "$schema": DRAFT,
        "$id": REPORT_ID,
        "title": "reluscope report",
        "description": "Activation health of a trained network: one entry per ReLU-family activation site. "
                       "Additive changes keep schema_version; objects may gain keys.",
        "type": "object",
        "required": ["schema_version", "tool", "model", "data", "run", "layers", "summary", "warnings", "gates"],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "tool": {
                "type": "object", "required": ["name", "version"],
                "properties": {"name": {"const": "reluscope"}, "version": _NAME},
            },
            "model": {
                "type": "object", "required": ["path", "format", "sha256"],
                "properties": {
                    "path": _nullable(_TEXT),
                    "format": {"enum": MODEL_FORMATS},
                    "sha256": _nullable({"type": "string", "pattern": "^[0-9a-f]{64}$"}),
                },
            },
            "data": {
                "type": "object", "required": ["source", "samples", "synthetic"],
                "properties": {
                    "source": _TEXT, "samples": _COUNT, "synthetic": {"type": "boolean"},
                    "normalize": {
                        "description": "Folders of images: pixels are divided by 255, then (x - mean) / std per "
                                       "channel (--normalize); `none` leaves them at 0..1. `mean`/`std` hold "
                                       "one value per channel.",
                        "type": "object", "required": ["method"],
                        "properties": {"method": {"enum": ["none", "imagenet", "custom"]},
                                       "mean": {"type": "array", "items": _NUMBER, "minItems": 1},
                                       "std": {"type": "array", "items": _NUMBER, "minItems": 1}},
                    },
                },
            },
            "run": {
                "type": "object", "required": ["backend", "device", "seconds"],
                "properties": {
                    "backend": {"enum": ["torch", "onnxruntime"]},
                    "device": _NAME,
                    "seconds": _NONNEG,
                    "rare_threshold": _FRACTION,
                    "dormant_tau": _NONNEG,
                    "batch_size": {"type": "integer", "minimum": 1},
                    "stats_kernel": {"description": "How the PyTorch backend computed site statistics: one-pass "
                                     "Triton kernel or PyTorch reductions (sites the kernel does not cover, "
                                     "e.g. PReLU or float64, always take PyTorch).",
                                     "enum": ["triton", "torch"]},
                },
            },
            "layers": {"type": "array", "items": {"$ref": "#/$defs/layer"}},
            "summary": {"$ref": "#/$defs/summary"},
            "warnings": {"type": "array", "items": _TEXT},
            "unanalysed": {
                "description": "Sites found in the model but not measured, with the reason. A report with "
                               "any (but those with `reached: false`) is incomplete: --fail-on rules that would read them fail (gate "
                               "`unanalysed sites > 0`), and a report with no measured site fails every gate "
                               "(`measured sites == 0`).",
                "type": "array",
                "items": {"type": "object", "required": ["name", "reason"],
                          "properties": {"name": _TEXT, "reason": _TEXT,
                                         "reached": {"description": "false: inside an If branch that no batch "
                                                     "took; such sites do not make the report incomplete",
                                                     "type": "boolean"}}},
            },
            "gradient_flow": {"$ref": "#/$defs/gradient_flow"},
            "gates": {"type": "array", "items": {"$ref": "#/$defs/gate"}},
        },
        "$defs": _DEFS,
    }


_METRICS = {"type": "object", "additionalProperties": _nullable(_NUMBER)}
_SIDE = {
    "type": "object", "required": ["path", "model"],
    "properties": {"path": _TEXT, "model": {"type": "object"}, "samples": _nullable(_COUNT)},
}


def diff_schema() -> dict[str, Any]:
    """The JSON Schema of `reluscope diff -f json` output."""
    return {
        "$schema": DRAFT,
        "$id": DIFF_ID,
        "title": "reluscope diff",
        "description": "Per-site changes between two reluscope reports (BASE -> NEW), matched by site name. "
                       "Metric objects map a metric (unit lists as counts) to its value; delta = NEW - BASE.",
        "type": "object",
        "required": ["schema_version", "kind", "tool", "base", "new", "sites", "added", "removed", "summary",
                     "gates"],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "kind": {"const": "diff"},
            "tool": {"type": "object", "required": ["name", "version"],
                     "properties": {"name": {"const": "reluscope"}, "version": _NAME}},
            "base": _SIDE,
            "new": _SIDE,
            "sites": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "status", "base", "new", "delta"],
                    "properties": {
                        "name": _NAME,
                        "status": {"enum": ["changed", "unchanged", "added", "removed"]},
                        "base": _nullable(_METRICS),
                        "new": _nullable(_METRICS),
                        "delta": _nullable(_METRICS),
                        "newly_dead": _nullable({"$ref": "#/$defs/unit_list"}),
                        "revived": _nullable({"$ref": "#/$defs/unit_list"}),
                    },
                },
            },
            "added": {"type": "array", "items": _NAME},
            "removed": {"type": "array", "items": _NAME},
            "summary": {
                "type": "object", "required": ["base", "new", "delta"],
                "properties": {"base": _METRICS, "new": _METRICS, "delta": _METRICS},
            },
            "gates": {"type": "array", "items": {"$ref": "#/$defs/gate"}},
        },
        "$defs": {"unit_list": _DEFS["unit_list"], "gate": _DEFS["gate"]},
    }


_COST = {"type": "object", "required": ["parameters", "macs", "latency_ms"],
         "properties": {"parameters": _COUNT, "macs": _COUNT, "latency_ms": _NONNEG}}


def prune_schema() -> dict[str, Any]:
    """The JSON Schema of `reluscope prune -f json` output."""
    unit_list = {"$ref": "#/$defs/unit_list"}
    summary_counts = ["sites", "units_before", "units_after", "candidates", "removed_units", "kept_units",
                      "parameters_before", "macs_before"]
    after = ["parameters_after", "macs_after"]
    ratios = ["parameters_ratio", "macs_ratio", "latency_ratio"]
    return {
        "$schema": DRAFT,
        "$id": PRUNE_ID,
        "title": "reluscope prune",
        "description": "What `reluscope prune` removed from a model: per site the units before and after, the units "
                       "removed and those kept with the reason; parameters, multiply-accumulates per sample and CPU "
                       "latency before and after (after: null when the verification failed); the verification of "
                       "the pruned outputs against the original's on the calibration data.",
        "type": "object",
        "required": ["schema_version", "kind", "tool", "model", "data", "run", "sites", "summary", "verification",
                     "output", "warnings"],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "kind": {"const": "prune"},
            "tool": {"type": "object", "required": ["name", "version"],
                     "properties": {"name": {"const": "reluscope"}, "version": _NAME}},
            "model": {"type": "object"},
            "data": {"type": "object"},
            "run": {"type": "object", "required": ["tolerance", "sites", "include_rarely_active"],
                    "properties": {"tolerance": _NONNEG, "sites": {"type": "array", "items": _TEXT},
                                   "include_rarely_active": {"type": "boolean"}}},
            "sites": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "op", "units_before", "units_after", "dead_units", "candidates",
                             "rarely_active_candidates", "removed_units", "kept_units"],
                "properties": {
                    "name": _NAME, "op": _NAME, "units_before": _COUNT, "units_after": _COUNT,
                    "dead_units": unit_list, "candidates": unit_list, "rarely_active_candidates": unit_list,
                    "removed_units": unit_list,
                    "kept_units": {"type": "array", "items": {
                        "type": "object", "required": ["unit", "reason"],
                        "properties": {"unit": _COUNT, "reason": _NAME}}},
                }}},
            "summary": {
                "type": "object", "required": summary_counts + after + ratios + ["latency_ms_before", "latency_ms_after"],
                "properties": {**{key: _COUNT for key in summary_counts}, **{key: _nullable(_COUNT) for key in after},
                               **{key: _nullable(_NONNEG) for key in ratios},
                               "latency_ms_before": _NONNEG, "latency_ms_after": _nullable(_NONNEG)},
            },
            "verification": {
                "type": "object",
                "required": ["samples", "max_abs_diff", "output_scale", "relative_diff", "tolerance", "passed"],
                "properties": {"samples": _COUNT, "max_abs_diff": _NONNEG, "output_scale": _NONNEG,
                               "relative_diff": _nullable(_NONNEG), "tolerance": _NONNEG,
                               "passed": {"type": "boolean"}, "mismatch": _TEXT},
            },
            "output": {"type": "object", "required": ["path", "format", "written", "dry_run"],
                       "properties": {"path": _nullable(_TEXT), "format": _nullable({"enum": [".pt", ".pt2", ".onnx"]}),
                                      "written": {"type": "boolean"}, "dry_run": {"type": "boolean"}}},
            "warnings": {"type": "array", "items": _TEXT},
            "unanalysed": {"type": "array", "items": {"type": "object"}},
        },
        "$defs": {"unit_list": _DEFS["unit_list"]},
    }


def schema_json(diff: bool = False, prune: bool = False) -> str:
    return json.dumps(prune_schema() if prune else diff_schema() if diff else report_schema(), indent=2)
