"""Gates: `--fail-on` rules evaluated against a report (or a diff of two reports).

A rule names the condition that FAILS the gate::

    [SCOPE:]METRIC OP NUMBER        OP: > >= < <= == !=

* Without a scope, a model-wide metric (one of the summary's fields, or `gradient_flow.X`)
  is checked once. A per-site metric without a scope (e.g. `max>1e4`) is checked at every site.
* With a scope (an `fnmatch` glob over site names, e.g. `features.*`, `conv2*`, `*`), a per-site
  metric is checked at every matching site; the gate fails if any site triggers it. A scope that
  matches no site is a usage error (a typo must not pass silently).
* Unit lists (`dead_units`, `rarely_active_units`, `dormant_units`) count their units.
* In `reluscope diff`, metrics carry a prefix: `delta.M` (NEW - BASE), `base.M` or `new.M`.

Rules are parsed (grammar and metric name) before any analysis runs; scopes are checked against
the report afterwards. Everything here is plain Python: no torch, cheap to import.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import UsageError
from .metrics import (SITE, SUMMARY, gate_metrics, hidden_site_fields, nested_site_fields, open_prefixes,
                      unit_list_fields)

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}

#: Per-site metrics (fields of `layers[]`) and model-wide ones (fields of `summary`, plus
#: `gradient_flow.X`), name -> help, from the catalogue. Unit lists count their units.
SITE_METRICS: dict[str, str] = gate_metrics(SITE)
SUMMARY_METRICS: dict[str, str] = gate_metrics(SUMMARY)

DIFF_PREFIXES = ("delta", "base", "new")
#: Open namespaces: any field below these is accepted at parse time and checked against the report.
_OPEN_SITE = open_prefixes(SITE)
_OPEN_SUMMARY = open_prefixes(SUMMARY)
_NESTED_SITE = nested_site_fields()  # layer fields holding {name: number}, flattened to `field.name`
_LIST_COUNTS = unit_list_fields()
_SKIP_SITE_FIELDS = hidden_site_fields()

GRAMMAR = "[SCOPE:]METRIC OP NUMBER, OP one of > >= < <= == !="
EXAMPLES = "dead_fraction>0.05   'features.*:dead_fraction>0.2'   'conv2*:dead_units>1'   '*:max>=6'"
DIFF_EXAMPLES = "delta.dead_units>0   'delta.zero_fraction>0.05'   'layer4.*:delta.dead_fraction>0.01'"

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_RULE = re.compile(
    r"^(?:(?P<scope>.*):)?\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*"
    r"(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>" + _NUMBER + r")\s*$"
)

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    text: str
    scope: str | None
    metric: str
    op: str
    threshold: float

    def triggered(self, value: float) -> bool:
        """True when `value` fails the gate."""
        return OPS[self.op](value, self.threshold)

    @property
    def base_metric(self) -> str:
        """The metric without a diff prefix (`delta.dead_units` -> `dead_units`)."""
        head, _, tail = self.metric.partition(".")
        return tail if head in DIFF_PREFIXES and tail else self.metric

    @property
    def prefix(self) -> str | None:
        head, _, tail = self.metric.partition(".")
        return head if head in DIFF_PREFIXES and tail else None


def _metric_list(diff: bool) -> str:
    names = sorted(set(SITE_METRICS) | set(SUMMARY_METRICS))
    listed = ", ".join(names)
    if diff:
        return f"delta.M, base.M or new.M, where M is one of: {listed}"
    return listed


def usage(problem: str, *, diff: bool = False, metrics: bool = False) -> UsageError:
    """A usage error that shows the grammar and examples (and, for metric problems, the metrics)."""
    examples = DIFF_EXAMPLES if diff else EXAMPLES
    listing = f". Metrics: {_metric_list(diff)}" if metrics else ""
    return UsageError(f"{problem}. A --fail-on rule is {GRAMMAR} (quote it in the shell), e.g. {examples}{listing}")


def _under(metric: str, prefixes: tuple[str, ...]) -> bool:
    return any(metric.startswith(p) and len(metric) > len(p) for p in prefixes)


def is_site_metric(metric: str) -> bool:
    # percentiles are a fixed set (the catalogue lists each); other nested fields stay open
    return metric in SITE_METRICS or _under(metric, _OPEN_SITE) and not metric.startswith("percentiles.")


def is_summary_metric(metric: str) -> bool:
    return metric in SUMMARY_METRICS or _under(metric, _OPEN_SUMMARY)


def is_gradient_metric(metric: str) -> bool:
    return metric.startswith("gradient.") or metric.startswith("gradient_flow.")


def parse_rule(text: str, *, diff: bool = False, gradients: bool | None = None) -> Rule:
    """Parse and check one rule: grammar, known metric, scope/metric fit.

    `diff`: rules for `reluscope diff` (metrics need a delta./base./new. prefix).
    `gradients`: whether gradients will be measured (False: gradient metrics are refused; None: unknown).
    """
    if not isinstance(text, str):
        raise usage(f"--fail-on rule {text!r} is not a string", diff=diff)
    stripped = text.strip()
    match = _RULE.match(stripped)
    if not match:
        hint = ""
        if re.search(r"(?<![<>=!])=(?!=)", stripped):
            hint = " (use == for equality)"
        raise usage(f"malformed --fail-on rule {stripped!r}{hint}", diff=diff)
    scope = match["scope"]
    if scope is not None:
        scope = scope.strip()
        if not scope:
            raise usage(f"--fail-on rule {stripped!r} has an empty scope before ':'", diff=diff)
    metric = match["metric"]
    threshold = float(match["number"])
    if not math.isfinite(threshold):
        raise usage(f"--fail-on rule {stripped!r}: the number must be finite", diff=diff)
    rule = Rule(text=stripped, scope=scope, metric=metric, op=match["op"], threshold=threshold)

    if diff:
        if rule.prefix is None:
            raise usage(f"--fail-on rule {stripped!r}: in diff, a metric needs a prefix: delta.{metric} "
                        f"(NEW - BASE), base.{metric} or new.{metric}", diff=True, metrics=True)
    elif rule.prefix is not None and not (is_site_metric(metric) or is_summary_metric(metric)):
        raise usage(f"--fail-on rule {stripped!r}: {rule.prefix}.* metrics exist only in `reluscope diff`",
                    metrics=True)
    name = rule.base_metric
    if not (is_site_metric(name) or is_summary_metric(name)):
        close = difflib.get_close_matches(name, sorted(set(SITE_METRICS) | set(SUMMARY_METRICS)), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise usage(f"unknown metric {name!r} in --fail-on rule {stripped!r}{hint}", diff=diff, metrics=True)
    if scope is not None and not is_site_metric(name):
        raise usage(f"--fail-on rule {stripped!r}: {name} is a model-wide metric; drop the scope "
                    f"{scope + ':'!r} (scopes select sites for per-site metrics)", diff=diff)
    if gradients is False and is_gradient_metric(name):
        raise UsageError(f"--fail-on rule {stripped!r} uses a gradient metric; add --gradients "
                         "(or gradients = true in the config) so that gradients are measured")
    return rule


def parse_rules(texts: Iterable[str] | None, *, diff: bool = False, gradients: bool | None = None) -> list[Rule]:
    return [parse_rule(t, diff=diff, gradients=gradients) for t in (texts or [])]


def needs_percentiles(rules: Iterable[Rule]) -> bool:
    """Whether a rule reads an output percentile: the analysis must then keep its histogram."""
    return any(rule.base_metric.startswith("percentiles.") for rule in rules)


# ---------------------------------------------------------------------------------------------------------------
# Metric values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def site_metrics(layer: Mapping[str, Any]) -> dict[str, float | None]:
    """Every numeric field of one `layers[]` entry; unit lists as counts, `gradient.X` flattened."""
    out: dict[str, float | None] = {}
    for key, value in layer.items():
        if key in _SKIP_SITE_FIELDS:
            continue
        if key in _LIST_COUNTS and isinstance(value, list):
            out[key] = len(value)
        elif key in _NESTED_SITE and isinstance(value, Mapping):
            for sub, sub_value in value.items():
                if _is_number(sub_value) or sub_value is None:
                    out[f"{key}.{sub}"] = sub_value
        elif _is_number(value) or (value is None and key in SITE_METRICS):
            out[key] = value
    return out


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float | None]:
    """Every numeric field of `summary`, plus `gradient_flow.X` for the numeric gradient-flow fields."""
    out: dict[str, float | None] = {}
    for key, value in (report.get("summary") or {}).items():
        if _is_number(value) or value is None:
            out[key] = value
    flow = report.get("gradient_flow")
    if isinstance(flow, Mapping) and flow.get("available", True):
        for key, value in flow.items():
            if _is_number(value) or (value is None and key != "loss"):
                out[f"gradient_flow.{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _worst(rule: Rule, values: Sequence[tuple[str, float]]) -> float | None:
    """The value to show for a set of sites: the one most in the rule's direction."""
    if not values:
        return None
    numbers = [v for _, v in values]
    if rule.op in (">", ">="):
        return max(numbers)
    if rule.op in ("<", "<="):
        return min(numbers)
    if rule.op == "!=":
        return max(numbers, key=lambda v: abs(v - rule.threshold))
    return min(numbers, key=lambda v: abs(v - rule.threshold))


def _gate(rule: Rule, passed: bool, offenders: list[str], value: float | None) -> dict[str, Any]:
    return {"rule": rule.text, "passed": passed, "offenders": offenders, "value": value}


def _site_names_hint(names: Sequence[str]) -> str:
    shown = ", ".join(names[:12])
    more = f", ... ({len(names)} in all)" if len(names) > 12 else ""
    return f"sites: {shown}{more}" if names else "the report has no sites"


def evaluate_rule(rule: Rule, sites: Sequence[tuple[str, Mapping[str, Any]]], summary: Mapping[str, Any], *,
                  all_site_names: Sequence[str] | None = None, diff: bool = False,
                  gradient_hint: str = " (was it made with --gradients?)") -> dict[str, Any]:
    """One gate entry. `sites`: (name, metrics) pairs; `summary`: model-wide metrics (same key space)."""
    metric = rule.metric
    name = rule.base_metric
    names = list(all_site_names) if all_site_names is not None else [n for n, _ in sites]
    if rule.scope is None and is_summary_metric(name):
        value = summary.get(metric, _MISSING)
        if value is _MISSING:
            raise usage(f"--fail-on rule {rule.text!r}: the report has no model-wide {metric}"
                        + (gradient_hint if is_gradient_metric(name) else ""), diff=diff)
        if value is None:
            return _gate(rule, True, [], None)
        return _gate(rule, not rule.triggered(value), [], value)

    scope = rule.scope or "*"
    matched = [(n, m) for n, m in sites if fnmatchcase(n, scope)]
    if rule.scope is not None and not any(fnmatchcase(n, scope) for n in names):
        raise usage(f"--fail-on rule {rule.text!r}: scope {scope!r} matches no site ({_site_names_hint(names)})",
                    diff=diff)
    present = [(n, m[metric]) for n, m in matched if metric in m]
    if matched and not present and (_under(name, _OPEN_SITE) or name not in SITE_METRICS):
        raise usage(f"--fail-on rule {rule.text!r}: no site in the report has {metric}"
                    + (gradient_hint if is_gradient_metric(name) else ""), diff=diff)
    evaluated = [(n, v) for n, v in present if v is not None]
    offenders = [(n, v) for n, v in evaluated if rule.triggered(v)]
    value = _worst(rule, offenders or evaluated)
    return _gate(rule, not offenders, [n for n, _ in offenders], value)


def evaluate(rules: Iterable[Rule], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Gate entries for `report["gates"]`. Raises UsageError for a scope that matches no site."""
    sites = [(layer["name"], site_metrics(layer)) for layer in report.get("layers", [])]
    summary = summary_metrics(report)
    flow = report.get("gradient_flow")
    hint = " (was it made with --gradients?)"
    if isinstance(flow, Mapping) and not flow.get("available", True):
        hint = f" (gradients were not measured: {flow.get('reason') or 'unavailable'})"
    rules = list(rules)
    gates = [evaluate_rule(rule, sites, summary, gradient_hint=hint) for rule in rules]
    incomplete = completeness_gate(rules, report)
    return gates + ([incomplete] if incomplete is not None else [])


def completeness_gate(rules: Sequence[Rule], report: Mapping[str, Any]) -> dict[str, Any] | None:
    """A failing gate entry when the report cannot vouch for its rules, else None.

    A report that measured no site fails any gate (no rule was checked against the model). Sites found but
    measured though the model ran them (`unanalysed`: inside a loop body, in a layout that cannot be read; not
    those of If branches no batch took, `reached: false`) fail the gate when a
    rule reads the model-wide summary or has a scope that matches one of them; rules scoped to measured
    sites only still decide alone. Like the rules, the entry names the condition that fails."""
    if not rules:
        return None
    # `reached: false`: in an If branch no batch took; nothing ran there to measure
    missing = [str(item.get("name")) for item in report.get("unanalysed") or []
               if isinstance(item, Mapping) and item.get("reached", True)]
    if not report.get("layers"):
        return {"rule": "measured sites == 0", "passed": False, "offenders": missing, "value": 0,
                "reason": "the report measured no activation site, so no rule was checked against the model"
                          + (f"; {len(missing)} found could not be measured (see unanalysed)" if missing else "")}
    affected = [rule.text for rule in rules
                if rule.scope is None or any(fnmatchcase(name, rule.scope) for name in missing)]
    if missing and affected:
        return {"rule": "unanalysed sites > 0", "passed": False, "offenders": missing, "value": len(missing),
                "reason": f"{len(missing)} site(s) found in the model were not measured (see unanalysed), and "
                          f"{', '.join(affected)} would read them"}
    return None


def failed(gates: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [g for g in gates if not g["passed"]]
