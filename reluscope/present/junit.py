"""JUnit XML for gate results: one test case per --fail-on rule, a `<failure>` for each failed one.

The layout is the common denominator that GitHub (test-reporter actions), GitLab, Jenkins and
Azure read: `<testsuites>` > `<testsuite>` > `<testcase classname name time>` > `<failure>`.
"""

from __future__ import annotations

import datetime as _dt
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..gate import describe, format_value
from ..output import write_atomic


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
                ET.SubElement(props, "property", {"name": str(key), "value": str(value)})
    for gate in gates:
        case = ET.SubElement(testsuite, "testcase", {"classname": classname, "name": gate["rule"], "time": "0"})
        if not gate["passed"]:
            offenders = gate.get("offenders") or []
            failure = ET.SubElement(case, "failure", {
                "message": f"{gate['rule']} (value {format_value(gate.get('value'))})",
                "type": "GateFailed",
            })
            lines = [describe(gate, max_offenders=len(offenders) or 1)]
            if offenders:
                lines.append("offending sites:")
                lines.extend(f"  {name}" for name in offenders)
            failure.text = "\n".join(lines)
        else:
            out = ET.SubElement(case, "system-out")
            out.text = describe(gate)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, gates: Iterable[Mapping[str, Any]], **kwargs: Any) -> None:
    write_atomic(path, junit_xml(gates, **kwargs))
