"""Configuration files: `[tool.reluscope]` in pyproject.toml, or a reluscope.toml.

Lookup starts in the current directory and walks up to the filesystem root, stopping after the
first directory that holds `.git` (the project root). In each directory `reluscope.toml` wins over
`pyproject.toml`; a pyproject.toml without a `[tool.reluscope]` table is passed over. `--config FILE`
names a file directly and `--no-config` skips the lookup.

A file found by the lookup is data from wherever the current folder is, so two rules hold (as
git's safe.directory does for repositories):
- a file, or its folder, that belongs to another user (neither you nor root) is passed over, with
  a warning: on a shared machine anyone can put a reluscope.toml in /tmp or a shared folder;
- a file above the repository root (no `.git` up to it: the repository root is then the current
  folder) may not set the keys that run code or write files (`arch`, `junit`): they are ignored,
  with a warning. The other keys apply. `--config FILE` is the user's own choice and is exempt.

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

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError
from .options import ANALYZE_OPTIONS, Option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_FILE = "reluscope.toml"
PYPROJECT = "pyproject.toml"

# config key -> its option; both follow from the declarations in options.py
ANALYZE_KEYS: dict[str, Option] = {o.key: o for o in ANALYZE_OPTIONS if o.config is not None}
DIFF_KEYS: dict[str, Option] = {o.key: o for o in ANALYZE_OPTIONS if o.config is not None and o.diff}
# keys a config file must not set, with the reason (e.g. trust-checkpoint)
REFUSED_KEYS: dict[str, str] = {o.key: o.not_in_config for o in ANALYZE_OPTIONS if o.not_in_config}
DIFF_TABLE = "diff"


@dataclass(frozen=True)
class Settings:
    """Values from one config file, keyed by the command's parameter names."""

    path: Path | None = None
    analyze: dict[str, Any] = field(default_factory=dict)
    diff: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # config files passed over, keys ignored

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
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}); TOML files are UTF-8, re-save it as such") from exc
    except RecursionError as exc:
        raise UsageError(f"config file {path} nests arrays or tables too deeply to read; a reluscope config "
                         "holds flat keys and lists of strings") from exc


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


def _foreign_owner(path: Path) -> int | None:
    """The owner of `path`, or of its folder, when that is neither this user nor root."""
    if not hasattr(os, "geteuid"):
        return None  # Windows: no uid to compare
    for item in (path, path.parent):
        try:
            uid = item.stat().st_uid
        except OSError:
            continue
        if uid not in (os.geteuid(), 0):
            return uid
    return None


@dataclass(frozen=True)
class _Found:
    path: Path | None
    above_root: bool = False  # found in a folder above the repository root
    warnings: tuple[str, ...] = ()


def _lookup(start: Path | None) -> _Found:
    here = (start or Path.cwd()).resolve()
    chain = (here, *here.parents)
    notes: list[str] = []
    for depth, folder in enumerate(chain):
        for candidate in (folder / CONFIG_FILE, folder / PYPROJECT):
            if not candidate.is_file() or candidate.name == PYPROJECT and not _mentions_reluscope(candidate):
                continue
            owner = _foreign_owner(candidate)
            if owner is not None:
                notes.append(f"ignored config file {candidate}: it or its folder belongs to another user (uid {owner}), "
                             "and a config file decides what reluscope runs and writes; use --config FILE to "
                             "read it anyway")
                continue
            in_repository = any((above / ".git").exists() for above in chain[depth:])
            return _Found(candidate, depth > 0 and not in_repository, tuple(notes))
        if (folder / ".git").exists():
            break
    return _Found(None, warnings=tuple(notes))


def find_config(start: Path | None = None) -> Path | None:
    """The nearest reluscope.toml, or pyproject.toml with [tool.reluscope], from `start` upwards,
    that belongs to this user or root (the module's doc)."""
    return _lookup(start).path


def _mentions_reluscope(pyproject: Path) -> bool:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if "reluscope" not in text:
        return False
    try:
        document = tomllib.loads(text)
    except RecursionError as exc:
        if "[tool.reluscope" in text:
            raise UsageError(f"config file {pyproject} nests arrays or tables too deeply to read; a reluscope "
                             "config holds flat keys and lists of strings") from exc
        return False
    except tomllib.TOMLDecodeError as exc:
        if "[tool.reluscope" in text:  # ours, but broken: say so rather than ignore it
            raise UsageError(f"config file {pyproject} is not valid TOML: {exc}") from exc
        return False
    tool = document.get("tool")
    return isinstance(tool, dict) and "reluscope" in tool


def _convert(path: Path, table: Mapping[str, Any], keys: Mapping[str, Option], where: str) -> dict[str, Any]:
    base = path.resolve().parent
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in REFUSED_KEYS:
            raise UsageError(f"config file {path}: unknown key {key!r} in {where}: {REFUSED_KEYS[key]}")
        if key not in keys:
            known = ", ".join(sorted(keys))
            hint = ""
            if key.replace("_", "-") in keys:
                hint = f" (did you mean {key.replace('_', '-')!r}?)"
            raise UsageError(f"config file {path}: unknown key {key!r} in {where}{hint}. Known keys: {known}")
        option = keys[key]
        try:
            out[option.name] = option.config(value, base)  # type: ignore[misc]  # keys hold config options only
        except TypeError as exc:
            raise UsageError(f"config file {path}: {where} key {key!r}: {exc}") from exc
    return out


def _powerless(path: Path, table: Mapping[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    """`table` without the keys that run code or write files, each one dropped said in `notes`."""
    kept = {}
    for key, value in table.items():
        option = ANALYZE_KEYS.get(key)
        if option is not None and option.powerful:
            notes.append(f"ignored {key!r} in {where} of config file {path}: the file is above the repository root "
                         f"(no .git between it and the current folder) and {option.powerful}; pass --{key} on the "
                         "command line, or --config FILE")
            continue
        kept[key] = value
    return kept


def load_settings(path: Path | None = None, *, start: Path | None = None) -> Settings:
    """Settings from `path`, or from the file `find_config` finds; empty Settings when there is none."""
    found = _Found(path)
    if path is None:
        found = _lookup(start)
        path = found.path
        if path is None:
            return Settings(warnings=found.warnings)
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
    notes = list(found.warnings)
    if found.above_root:
        analyze_table = _powerless(path, analyze_table, where, notes)
        diff_table = _powerless(path, diff_table, diff_where, notes)
    return Settings(path=path.resolve(), analyze=_convert(path, analyze_table, ANALYZE_KEYS, where),
                    diff=_convert(path, diff_table, DIFF_KEYS, diff_where), warnings=tuple(notes))
