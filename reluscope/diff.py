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
from .metrics import change_metrics
from .report import SCHEMA_VERSION

DEFAULT_RULES = ("delta.dead_units>0", "*:delta.dead_units>0")
#: Metrics whose change makes a site "changed" (others, such as mean/std, drift with any retraining).
CHANGE_METRICS = change_metrics()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


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
