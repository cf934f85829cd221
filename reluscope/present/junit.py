"""The JUnit format, for gate results: one test case per --fail-on rule, a `<failure>` for each failed one.

The layout is the common denominator that GitHub (test-reporter actions), GitLab, Jenkins and
Azure read: `<testsuites>` > `<testsuite>` > `<testcase classname name time>` > `<failure>`.

Every name and path passes through `cells.visible`: XML 1.0 has no way to write most control
characters (a raw one makes the file unparsable), and ElementTree escapes `<`, `&` and quotes.
"""

from __future__ import annotations

import datetime as _dt
import xml.etree.ElementTree as ET
from typing import Any, Iterable, Mapping

from .cells import is_diff
from .cells import describe, format_value, visible


def junit_xml(gates: Iterable[Mapping[str, Any]], *, suite: str = "reluscope", classname: str = "reluscope.gates",
              properties: Mapping[str, Any] | None = None, seconds: float = 0.0) -> str:
    gates = list(gates)
    failures = sum(1 for g in gates if not g["passed"])
    counts = {"tests": str(len(gates)), "failures": str(failures), "errors": "0", "skipped": "0"}
    root = ET.Element("testsuites", {"name": suite, **counts, "time": f"{seconds:.3f}"})
    testsuite = ET.SubElement(root, "testsuite", {
        "name": suite, **counts, "time": f"{seconds:.3f}",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    })
    if properties:
        props = ET.SubElement(testsuite, "properties")
        for key, value in properties.items():
            if value is not None:
                ET.SubElement(props, "property", {"name": visible(key), "value": visible(value)})
    for gate in gates:
        case = ET.SubElement(testsuite, "testcase", {"classname": classname, "name": visible(gate["rule"]),
                                                 "time": "0"})
        if not gate["passed"]:
            offenders = gate.get("offenders") or []
            failure = ET.SubElement(case, "failure", {
                "message": f"{visible(gate['rule'])} (value {format_value(gate.get('value'))})",
                "type": "GateFailed",
            })
            lines = [describe(gate, max_offenders=len(offenders) or 1)]
            if offenders:
                lines.append("offending sites:")
                lines.extend(f"  {visible(name)}" for name in offenders)
            failure.text = "\n".join(lines)
        else:
            out = ET.SubElement(case, "system-out")
            out.text = describe(gate)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


class JUnitFormat:
    """JUnit XML of a document's gates (`--junit FILE`): a report's cases carry the model's
    identity as properties, a diff's the two report paths."""

    def render(self, document: Mapping[str, Any]) -> str:
        gates = document.get("gates") or []
        if is_diff(document):
            return junit_xml(gates, classname="reluscope.diff",
                             properties={"base": document["base"]["path"], "new": document["new"]["path"]})
        model, data = document.get("model") or {}, document.get("data") or {}
        return junit_xml(gates, properties={"model": model.get("path"), "format": model.get("format"),
                                            "sha256": model.get("sha256"), "samples": data.get("samples")},
                         seconds=float((document.get("run") or {}).get("seconds") or 0.0))
