"""Output formats over a JSON payload (a report, or a diff of two reports).

Every format is an object with one interface (`Formatter`), one module each: table.py,
markdown.py, junit.py, and JSON below. `--format` picks one through `to_format(OutputFormat)`;
`--junit` always uses the JUnit one. present/emit.py writes the payload, the gates and the exit
code the same way for `analyze` and `diff`; present/cells.py holds the cell text they share.

Cheap to import: the format modules load on use.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Protocol

from ..options import OutputFormat
from .cells import is_diff  # noqa: F401 - re-exported


class Formatter(Protocol):
    #: Prints a Rich view on stdout (the gate table follows it there) instead of `render`'s text.
    terminal: bool
    #: Also appends the payload to $GITHUB_STEP_SUMMARY.
    step_summary: bool

    def render(self, document: Mapping[str, Any]) -> str:
        """The payload as text: what `-o FILE` holds, and what stdout gets unless `terminal`."""

    def print(self, document: Mapping[str, Any]) -> None:
        """The payload on stdout, for `terminal` formats only (the others' text goes out as it is)."""


class JsonFormat:
    """The JSON payload itself: the report (`reluscope schema`), or a diff (see schema.py)."""

    terminal = False
    step_summary = False

    def render(self, document: Mapping[str, Any]) -> str:
        return json.dumps(document, indent=2, allow_nan=False)


def to_format(fmt: OutputFormat, *, bars: bool = True) -> Formatter:
    """The formatter for a `--format` choice (the choices are declared with the other options);
    `bars`: the table's zero/dead share bars on a terminal."""
    if fmt is OutputFormat.json:
        return JsonFormat()
    if fmt is OutputFormat.markdown:
        from .markdown import MarkdownFormat

        return MarkdownFormat()
    from .table import TableFormat

    return TableFormat(bars=bars)
