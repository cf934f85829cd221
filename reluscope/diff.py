"""`reluscope diff BASE.json NEW.json`: what changed between two reports, site by site.

Sites are matched by name. Each matched site gets its metrics from both reports (unit lists as
counts, as in gates) and `delta = NEW - BASE`; sites only in one report are listed as added or
removed. By default the diff gates on dead units: it fails when the model as a whole, or any
matched site, has more dead units in NEW than in BASE. `--fail-on` rules on `delta.M`, `base.M`
and `new.M` replace that default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from ._version import __version__
from .errors import InputError
from .gate import Rule, evaluate_rule, parse_rules, site_metrics, summary_metrics
from .metrics import GRADIENT_FLOW, SITE_FIELDS, SUMMARY_FIELDS, Metric, change_metrics
from .report import SCHEMA_VERSION

DEFAULT_RULES = ("delta.dead_units>0", "*:delta.dead_units>0")
#: Metrics whose change makes a site "changed" (others, such as mean/std, drift with any retraining).
CHANGE_METRICS = change_metrics()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_MAX_NUMBER = 1.7e308  # a JSON number beyond float64 (10**400) is no measurement


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= _MAX_NUMBER if isinstance(value, int) else math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind_problem(metric: Metric, value: Any) -> str | None:
    """What is wrong with `value` for a catalogue field, or None."""
    if value is None:
        return None if metric.nullable or not metric.required else "is null"
    kind = metric.kind
    if kind in ("name", "text"):
        return None if isinstance(value, str) else f"is {type(value).__name__}, not text"
    if kind in ("count", "index"):
        return None if _number(value) and isinstance(value, int) and value >= 0 else \
            f"is {_shown(value)}, not a whole number >= 0"
    if kind in ("fraction", "number", "nonneg"):
        return None if _number(value) else f"is {_shown(value)}, not a number"
    if kind in ("unit_list", "shape"):
        ok = isinstance(value, list) and all(_number(v) and isinstance(v, int) and v >= 0 for v in value)
        return None if ok else "is not a list of whole numbers >= 0"
    if kind == "fractions":
        ok = isinstance(value, list) and all(_number(v) for v in value)
        return None if ok else "is not a list of numbers"
    if kind == "numbers":
        ok = isinstance(value, dict) and all(v is None or _number(v) for v in value.values())
        return None if ok else "is not an object of numbers"
    if not isinstance(value, dict):
        return f"is {type(value).__name__}, not an object"
    for member in metric.members:
        if member.name in value:
            problem = _kind_problem(member, value[member.name])
            if problem:
                return f".{member.name} {problem}"
    return None


def _check_fields(path: Path, where: str, entry: Mapping[str, Any], fields: tuple[Metric, ...]) -> None:
    for metric in fields:
        if metric.name not in entry:
            if metric.required:
                raise InputError(f"{path}: {where} has no {metric.name!r}; give a report written by "
                                 "reluscope analyze -f json -o FILE")
            continue
        problem = _kind_problem(metric, entry[metric.name])
        if problem:
            raise InputError(f"{path}: {where}.{metric.name} {problem.lstrip('.') if problem[0] == '.' else problem}; "
                             "the report is damaged or was edited, write it again with reluscope analyze -f json")


def _check_report(path: Path, report: Mapping[str, Any]) -> None:
    """Every field diff reads has its documented type (metrics.py): a damaged or edited report is
    one clear line, never a crash halfway through the comparison."""
    for key in ("model", "data", "run", "tool"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            raise InputError(f"{path}: {key} must be an object, not {type(report[key]).__name__}; the report is damaged "
                             "or was edited, write it again with reluscope analyze -f json")
    samples = (report.get("data") or {}).get("samples")
    if samples is not None and not (_number(samples) and isinstance(samples, int)):
        raise InputError(f"{path}: data.samples is {_shown(samples)}, not a whole number")
    seen: set[str] = set()
    for index, layer in enumerate(report["layers"]):
        if layer["name"] in seen:
            raise InputError(f"{path}: two sites are named {layer['name']!r}; site names in a report are unique")
        seen.add(layer["name"])
        _check_fields(path, f"layers[{index}]", layer, SITE_FIELDS)
    _check_fields(path, "summary", report["summary"], SUMMARY_FIELDS)
    flow = report.get("gradient_flow")
    if flow is not None:
        problem = _kind_problem(GRADIENT_FLOW, flow)
        if problem:
            raise InputError(f"{path}: gradient_flow{problem if problem[0] == '.' else ' ' + problem}")


def load_report(path: Path) -> dict[str, Any]:
    """Read a report written by `reluscope analyze -f json`; one clear error for anything else."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a report written by `reluscope analyze -f json -o FILE`")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it: {exc}") from exc
    try:
        report = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON ({exc.msg} at line {exc.lineno}); give a report written by "
                         "`reluscope analyze -f json -o FILE`") from exc
    except RecursionError as exc:
        raise InputError(f"{path} nests arrays or objects too deeply to be a report; give a report written by "
                         "reluscope analyze -f json -o FILE") from exc
    except ValueError as exc:
        raise InputError(f"{path}: {exc}; reports hold null, never NaN or Infinity") from exc
    if not isinstance(report, dict) or "layers" not in report or "summary" not in report:
        raise InputError(f"{path} is not a reluscope report (no layers/summary); write one with "
                         "`reluscope analyze -f json -o FILE`")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(f"{path} has schema_version {version!r}; this reluscope reads version {SCHEMA_VERSION}. "
                         "Re-run the analysis with this version")
    layers = report["layers"]
    if not isinstance(layers, list) or not all(isinstance(l, dict) and isinstance(l.get("name"), str)
                                               for l in layers):
        raise InputError(f"{path}: `layers` must be a list of sites with names")
    if not isinstance(report["summary"], dict):
        raise InputError(f"{path}: `summary` must be an object")
    _check_report(path, report)
    return report


def _delta(base: Any, new: Any) -> float | None:
    if base is None or new is None:
        return None
    value = new - base
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _deltas(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, float | None]:
    return {key: _delta(base[key], new[key]) for key in new if key in base}


def _differs(delta: Mapping[str, Any], base: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    for key in CHANGE_METRICS:
        if (base.get(key) is None) != (new.get(key) is None):
            return True
        value = delta.get(key)
        if value is not None and not math.isclose(value, 0.0, abs_tol=1e-12):
            return True
    return False


def _side(path: Path, report: Mapping[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "model": report.get("model") or {},
            "samples": (report.get("data") or {}).get("samples")}


def diff_reports(base: Mapping[str, Any], new: Mapping[str, Any], *, base_path: Path, new_path: Path) -> dict[str, Any]:
    """The diff document (without gates; see `gate_diff`)."""
    base_layers = {layer["name"]: layer for layer in base["layers"]}
    new_layers = {layer["name"]: layer for layer in new["layers"]}
    sites: list[dict[str, Any]] = []
    order = [layer["name"] for layer in new["layers"]] + [n for n in base_layers if n not in new_layers]
    for name in order:
        b, n = base_layers.get(name), new_layers.get(name)
        bm = site_metrics(b) if b is not None else None
        nm = site_metrics(n) if n is not None else None
        entry: dict[str, Any] = {"name": name, "base": bm, "new": nm, "delta": None, "newly_dead": None,
                                 "revived": None}
        if bm is None:
            entry["status"] = "added"
        elif nm is None:
            entry["status"] = "removed"
        else:
            assert b is not None and n is not None
            entry["delta"] = _deltas(bm, nm)
            if b.get("units") == n.get("units"):
                before, after = set(b.get("dead_units") or []), set(n.get("dead_units") or [])
                entry["newly_dead"] = sorted(after - before)
                entry["revived"] = sorted(before - after)
            changed = _differs(entry["delta"], bm, nm) or bool(entry["newly_dead"]) or bool(entry["revived"])
            entry["status"] = "changed" if changed else "unchanged"
        sites.append({"name": name, "status": entry.pop("status"), **entry})
    base_summary, new_summary = summary_metrics(base), summary_metrics(new)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "diff",
        "tool": {"name": "reluscope", "version": __version__},
        "base": _side(base_path, base),
        "new": _side(new_path, new),
        "sites": sites,
        "added": [s["name"] for s in sites if s["status"] == "added"],
        "removed": [s["name"] for s in sites if s["status"] == "removed"],
        "summary": {"base": base_summary, "new": new_summary, "delta": _deltas(base_summary, new_summary)},
        "gates": [],
    }


def _prefixed(side: str, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    return {f"{side}.{k}": v for k, v in (metrics or {}).items()}


def gate_diff(rules: list[Rule], diff: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Evaluate diff rules (`delta.M`, `base.M`, `new.M`) against a diff document."""
    sites = []
    for site in diff["sites"]:
        metrics = {**_prefixed("base", site["base"]), **_prefixed("new", site["new"]),
                   **_prefixed("delta", site["delta"])}
        sites.append((site["name"], metrics))
    summary = {**_prefixed("base", diff["summary"]["base"]), **_prefixed("new", diff["summary"]["new"]),
               **_prefixed("delta", diff["summary"]["delta"])}
    names = [s["name"] for s in diff["sites"]]
    return [evaluate_rule(rule, sites, summary, all_site_names=names, diff=True) for rule in rules]


def default_rules(diff: Mapping[str, Any] | None = None) -> list[Rule]:
    """The default gate; the per-site half only when there are sites (a scope must match one)."""
    texts = DEFAULT_RULES if diff is None or diff["sites"] else DEFAULT_RULES[:1]
    return parse_rules(texts, diff=True)
