"""Configuration files: `[tool.reluscope]` in pyproject.toml, or a reluscope.toml.

Lookup starts in the current directory and walks up to the filesystem root, stopping after the
first directory that holds `.git` (the project root). In each directory `reluscope.toml` wins over
`pyproject.toml`; a pyproject.toml without a `[tool.reluscope]` table is passed over. `--config FILE`
names a file directly and `--no-config` skips the lookup.

Keys are the long option names without the dashes; relative paths (`data`, the file part of
`arch`, `junit`) are relative to the directory of the config file. Options given on the command line
win over the file. `reluscope diff` reads its own sub-table, `[tool.reluscope.diff]` (or `[diff]` in
reluscope.toml), with `fail-on` and `format`.

    [tool.reluscope]
    data = "calib/digits.npz"
    arch = "models/arch.py:build"
    batch-size = 128
    fail-on = ["dead_fraction>0.05", "features.*:dead_units>4"]

    [tool.reluscope.diff]
    fail-on = ["delta.dead_units>0", "delta.zero_fraction>0.05"]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_FILE = "reluscope.toml"
PYPROJECT = "pyproject.toml"
FORMATS = ("table", "json", "markdown")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {type(value).__name__} {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
    return value


def _format(value: Any) -> str:
    if value not in FORMATS:
        raise TypeError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return value


def _rules(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of rule strings, got {value!r}")
    return list(value)


def _shape(value: Any) -> str:
    """`"3,224,224"` or `[3, 224, 224]`; handed on as the CLI's text form."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    raise TypeError(f"expected a string like \"3,224,224\" or a list of integers, got {value!r}")


def _path(base: Path) -> Callable[[Any], Path]:
    def convert(value: Any) -> Path:
        path = Path(_str(value)).expanduser()
        return path if path.is_absolute() else base / path

    return convert


def _arch(base: Path) -> Callable[[Any], str]:
    """`FILE.py:FACTORY` gets its file resolved against the config's folder; `package.module:F` stays."""

    def convert(value: Any) -> str:
        spec = _str(value)
        target, sep, factory = spec.rpartition(":")
        if sep and (target.endswith(".py") or "/" in target or "\\" in target):
            file = Path(target).expanduser()
            return f"{file if file.is_absolute() else base / file}:{factory}"
        return spec

    return convert


# kebab-case key -> (parameter name of the command, converter factory taking the config folder)
ANALYZE_KEYS: dict[str, tuple[str, Callable[[Path], Callable[[Any], Any]]]] = {
    "data": ("data", _path),
    "arch": ("arch", _arch),
    "input-shape": ("input_shape", lambda base: _shape),
    "batch-size": ("batch_size", lambda base: _int),
    "max-samples": ("max_samples", lambda base: _int),
    "device": ("device", lambda base: _str),
    "format": ("output_format", lambda base: _format),
    "unit-axis": ("unit_axis", lambda base: _int),
    "rare-threshold": ("rare_threshold", lambda base: _float),
    "dormant-tau": ("dormant_tau", lambda base: _float),
    "gradients": ("gradients", lambda base: _bool),
    "percentiles": ("percentiles", lambda base: _bool),
    "stats-kernel": ("stats_kernel", lambda base: _str),
    "loss": ("loss", lambda base: _str),
    "fail-on": ("fail_on", lambda base: _rules),
    "junit": ("junit", _path),
}
DIFF_KEYS: dict[str, tuple[str, Callable[[Path], Callable[[Any], Any]]]] = {
    "format": ("output_format", lambda base: _format),
    "fail-on": ("fail_on", lambda base: _rules),
    "junit": ("junit", _path),
}
DIFF_TABLE = "diff"


@dataclass(frozen=True)
class Settings:
    """Values from one config file, keyed by the command's parameter names."""

    path: Path | None = None
    analyze: dict[str, Any] = field(default_factory=dict)
    diff: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.path is None:
            return "no config file"
        return f"{self.path}" + (" [tool.reluscope]" if self.path.name == PYPROJECT else "")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"config file {path}: cannot read it: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc


def _table_of(path: Path, document: dict[str, Any]) -> dict[str, Any] | None:
    """The reluscope table of a parsed file: `[tool.reluscope]` of a pyproject.toml, else the whole file."""
    if path.name == PYPROJECT:
        tool = document.get("tool")
        if not isinstance(tool, dict) or "reluscope" not in tool:
            return None
        table = tool["reluscope"]
        if not isinstance(table, dict):
            raise UsageError(f"config file {path}: [tool.reluscope] must be a table")
        return table
    return document


def find_config(start: Path | None = None) -> Path | None:
    """The nearest reluscope.toml, or pyproject.toml with [tool.reluscope], from `start` upwards."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
        pyproject = folder / PYPROJECT
        if pyproject.is_file() and _mentions_reluscope(pyproject):
            return pyproject
        if (folder / ".git").exists():
            break
    return None


def _mentions_reluscope(pyproject: Path) -> bool:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if "reluscope" not in text:
        return False
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        if "[tool.reluscope" in text:  # ours, but broken: say so rather than ignore it
            raise UsageError(f"config file {pyproject} is not valid TOML: {exc}") from exc
        return False
    tool = document.get("tool")
    return isinstance(tool, dict) and "reluscope" in tool


def _convert(path: Path, table: Mapping[str, Any], keys: Mapping[str, tuple[str, Callable[[Path], Callable[[Any], Any]]]],
             where: str) -> dict[str, Any]:
    base = path.resolve().parent
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            known = ", ".join(sorted(keys))
            hint = ""
            if key.replace("_", "-") in keys:
                hint = f" (did you mean {key.replace('_', '-')!r}?)"
            raise UsageError(f"config file {path}: unknown key {key!r} in {where}{hint}. Known keys: {known}")
        param, factory = keys[key]
        try:
            out[param] = factory(base)(value)
        except TypeError as exc:
            raise UsageError(f"config file {path}: {where} key {key!r}: {exc}") from exc
    return out


def load_settings(path: Path | None = None, *, start: Path | None = None) -> Settings:
    """Settings from `path`, or from the file `find_config` finds; empty Settings when there is none."""
    if path is None:
        path = find_config(start)
        if path is None:
            return Settings()
    elif not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    document = _read_toml(path)
    table = _table_of(path, document)
    if table is None:
        raise UsageError(f"config file {path} has no [tool.reluscope] table")
    where = "[tool.reluscope]" if path.name == PYPROJECT else "the file"
    analyze_table = {k: v for k, v in table.items() if k != DIFF_TABLE}
    diff_table = table.get(DIFF_TABLE, {})
    if not isinstance(diff_table, dict):
        raise UsageError(f"config file {path}: {DIFF_TABLE!r} must be a table ([tool.reluscope.diff])")
    diff_where = "[tool.reluscope.diff]" if path.name == PYPROJECT else "[diff]"
    return Settings(path=path.resolve(), analyze=_convert(path, analyze_table, ANALYZE_KEYS, where),
                    diff=_convert(path, diff_table, DIFF_KEYS, diff_where))
