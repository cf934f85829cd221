"""Hostile names, interrupted and failed writes, hung models, bad inputs that used to end in exit 3,
config files from elsewhere, and modules whose train()/eval() do work (the security issue's output
items). Every file and name is built here, for real: an ONNX graph whose node names carry Rich
markup, escape sequences, control characters and markdown; an ONNX Loop that never ends; a
PNG that declares ten billion pixels; a config owned by another user.

The `EXTRA_CASES` below are rows of docs/errors.md: test_hostile.py runs them with the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope.cli import app

from conftest import ARCHITECTURES, CALIB, REPO, SAMPLES

runner = CliRunner()

HOSTILE_NAMES = [
    "close[/]",                       # Rich markup: crashed the table with exit 3
    "[link=http://x]click[/link]",    # a disguised link
    "resnet[v2]",                     # shown as `resnet`
    "clear\x1b[2J\x1b[H",             # clears the screen
    "osc\x1b]8;;http://evil\x1b\\here\x1b]8;;\x1b\\",  # an OSC 8 hyperlink
    "cr\rrow",                        # carriage return: breaks a markdown row, overwrites a terminal line
    "nul\x00bell\x07",                # controls: XML 1.0 cannot hold them
    "@someone",                       # a mention
    "<img src=x>",                    # raw HTML
    "![x](http://y)",                 # an image
    "pipe|tick`",                     # table and code-span syntax
]


# ---------------------------------------------------------------------------------------------- models
def hostile_onnx(path: Path, names: list[str] = HOSTILE_NAMES) -> None:
    """x (batch, 4) -> one Relu per name, chained; each node named by one hostile name."""
    nodes, previous = [], "x"
    for index, name in enumerate(names):
        output = f"t{index}"
        nodes.append(helper.make_node("Relu", [previous], [output], name=name))
        previous = output
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def endless_onnx(path: Path) -> None:
    """A Relu, then an ONNX Loop with a 2^62 trip count: onnxruntime's run never returns."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Loop", ["trip", "cond", "r"], ["y"], body=body, name="forever")]
    graph = helper.make_graph(
        nodes, "endless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("trip", TensorProto.INT64, [], [2**62]), helper.make_tensor("cond", TensorProto.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def png_bomb(path: Path) -> None:
    """A valid PNG header declaring 100000 x 100000 pixels over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def _data(path: Path, rows: int = 8) -> None:
    np.savez(path, x=np.random.default_rng(0).normal(size=(rows, 4)).astype(np.float32))


def _cli(args: list[str]) -> Any:
    result = runner.invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _env() -> dict[str, str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", PYTHONPATH=str(REPO))
    env.pop("FORCE_COLOR", None)
    return env


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".") or n.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- names
def _no_raw_controls(text: str) -> None:
    assert not any(ch in text for ch in "\x1b\r\x00\x07"), repr(text)


def test_hostile_names_are_escaped_in_every_format(tmp_path: Path) -> None:
    model, data = tmp_path / "resnet[v2].onnx", tmp_path / "calib.npz"
    hostile_onnx(model)
    _data(data)
    base = ["analyze", str(model), "--data", str(data), "--fail-on", "*:dead_units>=0"]

    # table on the terminal (stdout): no markup interpreted, no raw escape, every name shown
    table = _cli(base)
    assert table.exit_code == 1, table.output  # the gate fails on every site: offenders listed too
    _no_raw_controls(table.stdout + table.stderr)
    assert "resnet[v2].onnx" in table.stdout
    for shown in ("close[/]", "[link=http://x]click[/link]", "resnet[v2]", "clear\\x1b[2J\\x1b[H", "cr\\x0drow",
                  "nul\\x00bell\\x07", "@someone", "<img src=x>", "![x](http://y)"):
        assert shown in table.stdout, shown

    # table in a file
    out = tmp_path / "report.txt"
    assert _cli([*base, "-o", str(out), "-q"]).exit_code == 1
    text = out.read_text()
    _no_raw_controls(text)
    assert "close[/]" in text and "[link=http://x]click[/link]" in text and "clear\\x1b[2J" in text

    # markdown: names in code spans, no row broken, nothing raw
    md = _cli([*base, "-f", "markdown"])
    assert md.exit_code == 1
    _no_raw_controls(md.stdout)
    rows = [line for line in md.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == len(HOSTILE_NAMES)
    header = next(line for line in md.stdout.splitlines() if line.startswith("| site |"))
    for row in rows:  # each row has the header's number of cells: no pipe or CR ended one early
        assert len(row.replace("\\|", "").split("|")) == len(header.split("|")), row
    for dangerous in ("@someone", "<img src=x>", "![x](http://y)"):
        assert f"`{dangerous}`" in md.stdout  # inside a code span: no mention, HTML or image
    assert "`` pipe\\|tick` ``" in md.stdout  # a fence longer than the run of backticks in the name

    # JUnit parses, and names the offending sites
    junit = tmp_path / "gates.xml"
    assert _cli([*base, "-f", "json", "-o", str(tmp_path / "r.json"), "--junit", str(junit), "-q"]).exit_code == 1
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and "nul\\x00bell\\x07" in (failure.text or "") and "close[/]" in (failure.text or "")

    # JSON keeps the data as it is
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == HOSTILE_NAMES
    assert report["model"]["path"].endswith("resnet[v2].onnx")


def test_hostile_torch_module_names(tmp_path: Path) -> None:
    """The same through PyTorch: module names from an --arch factory, in the table and markdown."""
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    model = nn.Sequential()\n"
        "    model.add_module('lin', nn.Linear(4, 4))\n"
        "    model.add_module('close[/]\\x1b[2J', nn.ReLU())\n"
        "    model.add_module('@someone<img src=x>\\r', nn.ReLU())\n"
        "    return model\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import arch  # type: ignore[import-not-found]

        torch.save(arch.build().state_dict(), tmp_path / "model.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("arch", None)
    _data(tmp_path / "calib.npz")
    base = ["analyze", str(tmp_path / "model.pt"), "--arch", f"{tmp_path / 'arch.py'}:build", "--data",
            str(tmp_path / "calib.npz")]
    table = _cli(base)
    assert table.exit_code == 0, table.output
    _no_raw_controls(table.stdout)
    assert "close[/]\\x1b[2J" in table.stdout and "@someone<img src=x>\\x0d" in table.stdout
    md = _cli([*base, "-f", "markdown"])
    _no_raw_controls(md.stdout)
    assert "`@someone<img src=x>\\x0d`" in md.stdout


def test_markup_in_an_error_line_and_a_path(tmp_path: Path) -> None:
    """A path with markup and an escape sequence in the one error line: shown, not interpreted."""
    missing = tmp_path / "gone[/]\x1b[2J.onnx"
    result = _cli(["analyze", str(missing), "--input-shape", "4"])
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert "gone[/]\\x1b[2J.onnx" in line and "\x1b" not in line


# ---------------------------------------------------------------------------------------------- writes
def test_a_failed_junit_write_leaves_no_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the JUnit file is written: no report either, one line, old files intact."""
    from reluscope import output

    model, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    hostile_onnx(model, ["relu"])
    _data(data)
    report, junit = tmp_path / "report.json", tmp_path / "gates.xml"
    report.write_text("old report\n")
    real_stage = output._stage

    def stage(path: Path, text: str, kind: str) -> str:
        if path.name == "gates.xml":
            raise output.InputError(f"cannot write {path}: No space left on device")
        return real_stage(path, text, kind)

    monkeypatch.setattr(output, "_stage", stage)
    result = _cli(["analyze", str(model), "--data", str(data), "-f", "json", "-o", str(report), "--junit", str(junit),
                   "--fail-on", "dead_fraction>0.5"])
    assert result.exit_code == 2
    assert _one_error_line(result.stderr) == f"error: cannot write {junit}: No space left on device"
    assert result.stdout == ""
    assert report.read_text() == "old report\n" and not junit.exists()
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_puts_the_first_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    hostile_onnx(model, ["relu"])
    _data(data)
    report, junit = tmp_path / "report.json", tmp_path / "gates.xml"
    report.write_text("old report\n")
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith("gates.xml"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = _cli(["analyze", str(model), "--data", str(data), "-f", "json", "-o", str(report), "--junit", str(junit)])
    assert result.exit_code == 2
    assert _one_error_line(result.stderr) == (f"error: cannot write {junit}: No space left on device; nothing was "
                                              "written")
    assert report.read_text() == "old report\n" and not junit.exists()
    assert _leftovers(tmp_path) == []


SIGTERM_DURING_WRITE = """
import os, signal, sys
calls = []
real_fsync = os.fsync
def fsync(fd):
    real_fsync(fd)
    calls.append(fd)
    if len(calls) == 2:  # the second output is staged: SIGTERM now, as a CI runner cancelling the job
        os.kill(os.getpid(), signal.SIGTERM)
os.fsync = fsync
from reluscope.cli import main
main(sys.argv[1:])
"""


def test_sigterm_during_a_write_leaves_nothing(tmp_path: Path) -> None:
    model, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    hostile_onnx(model, ["relu"])
    _data(data)
    report, junit = tmp_path / "report.json", tmp_path / "gates.xml"
    report.write_text("old report\n")
    proc = subprocess.run([sys.executable, "-c", SIGTERM_DURING_WRITE, "analyze", str(model), "--data", str(data),
                           "-f", "json", "-o", str(report), "--junit", str(junit)],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert _one_error_line(proc.stderr) == "error: terminated (SIGTERM)"
    assert report.read_text() == "old report\n" and not junit.exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- hung models
def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "reluscope", *args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("signum,code,line", [(signal.SIGINT, 130, "error: interrupted"),
                                              (signal.SIGTERM, 143, "error: terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_a_model_that_never_finishes_stops_on_a_signal(tmp_path: Path, signum: int, code: int, line: str) -> None:
    endless_onnx(tmp_path / "endless.onnx")
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(["analyze", "endless.onnx", "--input-shape", "4", "-o", "out/report.json", "--junit",
                   "out/gates.xml"], tmp_path)
    time.sleep(2.5)  # well inside onnxruntime's run by now
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5, "it did not stop within seconds"
    assert proc.returncode == code, stderr
    assert _one_error_line(stderr) == line and stdout == ""
    assert os.listdir(out) == []


def test_timeout_stops_a_model_that_never_finishes(tmp_path: Path) -> None:
    endless_onnx(tmp_path / "endless.onnx")
    started = time.monotonic()
    proc = _start(["analyze", "endless.onnx", "--input-shape", "4", "-o", "report.json", "--timeout", "2"], tmp_path)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert _one_error_line(stderr).startswith("error: the analysis did not finish within --timeout 2 s")
    assert time.monotonic() - started < 30
    assert sorted(os.listdir(tmp_path)) == ["endless.onnx"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_timeout_must_be_positive(tmp_path: Path, value: str) -> None:
    result = _cli(["analyze", str(SAMPLES / "digits_mlp.onnx"), "--input-shape", "1,8,8", "--timeout", value])
    assert result.exit_code == 2
    assert _one_error_line(result.stderr) == f"error: --timeout must be a positive number of seconds, not {float(value)}"


def test_a_normal_run_with_timeout_is_unchanged(tmp_path: Path) -> None:
    result = _cli(["analyze", str(SAMPLES / "digits_mlp.onnx"), "--data", str(CALIB), "-f", "json", "--timeout", "120"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["summary"]["layers"] == 2


# ---------------------------------------------------------------------------------------------- exit 3 -> exit 2
def _report(work: Path) -> dict[str, Any]:
    result = _cli(["analyze", str(work / "digits_mlp.onnx"), "--data", str(work / "calib.npz"), "-f", "json"])
    assert result.exit_code == 0
    return json.loads(result.stdout)


def _bad_report(name: str, change: Any) -> Any:
    def write(work: Path) -> None:
        report = _report(work)
        change(report)
        (work / "base.json").write_text(json.dumps(_report(work)))
        (work / name).write_text(json.dumps(report))
    return write


def _deep_json(work: Path) -> None:
    (work / "base.json").write_text(json.dumps(_report(work)))
    (work / "deep.json").write_text("[" * 100_000)


def _write(name: str, data: bytes) -> Any:
    return lambda work: (work / name).write_bytes(data)


def _nothing(work: Path) -> None:
    pass


#: case -> (setup, run as a real process). docs/errors.md has a row for each; test_hostile.py runs them.
EXTRA_CASES: dict[str, tuple[Any, bool]] = {
    "dormant-tau-nan": (_nothing, False),
    "dormant-tau-inf": (_nothing, False),
    "device-huge-index": (_nothing, False),
    "input-shape-absurd": (_nothing, False),
    "input-shape-too-large": (_nothing, False),
    "out-of-memory": (_nothing, True),
    "png-bomb": (lambda work: png_bomb(work / "images" / "bomb.png"), False),
    "config-not-utf8": (_write("bad.toml", b'data = "\xff\xfe"\n'), False),
    "config-deep": (_write("deep.toml", b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n"), False),
    "world-size": (_nothing, True),
    "diff-deep-json": (_deep_json, False),
    "diff-dead-units-number": (_bad_report("edited.json", lambda r: r["layers"][0].__setitem__("dead_units", 5)), False),
    "diff-dead-units-objects": (_bad_report("edited.json", lambda r: r["layers"][0].__setitem__("dead_units", [{}])),
                                False),
    "diff-data-number": (_bad_report("edited.json", lambda r: r.__setitem__("data", 5)), False),
    "diff-huge-number": (_bad_report("edited.json", lambda r: r["layers"][0].__setitem__("zero_fraction", 10**400)),
                         False),
    "diff-duplicate-site": (_bad_report("edited.json", lambda r: r["layers"].append(dict(r["layers"][0]))), False),
}


# ---------------------------------------------------------------------------------------------- config files
def _marker_arch(folder: Path, marker: Path) -> Path:
    arch = folder / "evil_arch.py"
    arch.write_text(f"open({str(marker)!r}, 'w').close()\n" + ARCHITECTURES.read_text() + "\nbuild = digits_mlp\n")
    return arch


def _as_another_user(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `path` belong to someone else: chown as root, else pretend to be another uid."""
    if os.geteuid() == 0:
        os.chown(path, 12345, 12345)
    else:
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)


def test_a_config_file_of_another_user_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared, work = tmp_path / "shared", tmp_path / "shared" / "me" / "project"
    work.mkdir(parents=True)
    (work / ".git").mkdir()
    marker = tmp_path / "PWNED"
    arch = _marker_arch(shared, marker)
    config = shared / "me" / "project" / "reluscope.toml"
    config.write_text(f'arch = "{arch}:build"\njunit = "{tmp_path / "victim.xml"}"\nfail-on = ["dead_fraction>0"]\n')
    _as_another_user(config, monkeypatch)
    monkeypatch.chdir(work)
    result = _cli(["analyze", str(SAMPLES / "digits_mlp.onnx"), "--data", str(CALIB), "-f", "json"])
    assert result.exit_code == 0, result.output  # its gate is not applied either
    assert not marker.exists() and not (tmp_path / "victim.xml").exists()
    assert result.stderr.strip().splitlines()[0].startswith(f"warning: ignored config file {config}: it or its folder "
                                                            "belongs to another user")


def test_a_config_above_the_repository_root_may_not_run_code_or_write(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    above, work = tmp_path / "home", tmp_path / "home" / "downloads" / "model"
    work.mkdir(parents=True)  # no .git anywhere: the current folder is the root
    marker = tmp_path / "PWNED"
    arch = _marker_arch(above, marker)
    shutil.copy(SAMPLES / "digits_mlp.pt", work / "model.pt")
    victim = tmp_path / "victim.xml"
    victim.write_text("precious\n")
    (above / "reluscope.toml").write_text(f'arch = "{arch}:build"\njunit = "{victim}"\nbatch-size = 7\n')
    monkeypatch.chdir(work)
    result = _cli(["analyze", str(SAMPLES / "digits_mlp.onnx"), "--data", str(CALIB), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert not marker.exists() and victim.read_text() == "precious\n"
    assert json.loads(result.stdout)["run"]["batch_size"] == 7  # the harmless key applies
    warnings = result.stderr.strip().splitlines()
    assert any("ignored 'arch'" in w and "it runs Python code" in w for w in warnings), warnings
    assert any("ignored 'junit'" in w and "it writes a file" in w for w in warnings), warnings
    # inside a repository the same file is the project's own
    (above / ".git").mkdir()
    inside = _cli(["analyze", "model.pt", "--data", str(CALIB), "-f", "json"])
    assert inside.exit_code == 0, inside.output
    assert marker.exists() and victim.read_text().startswith("<?xml")


# ---------------------------------------------------------------------------------------------- modes
class MergingLinear(nn.Module):
    """A LoRA-style adapter: eval() merges the low-rank update into the weight, train() takes it
    out again; forward adds the update only while it is not merged."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.a = nn.Parameter(torch.randn(2, 4))
        self.b = nn.Parameter(torch.randn(4, 2))
        self.merged = False

    def train(self, mode: bool = True) -> "MergingLinear":
        super().train(mode)
        with torch.no_grad():
            if not mode and not self.merged:
                self.base.weight += self.b @ self.a
                self.merged = True
            elif mode and self.merged:
                self.base.weight -= self.b @ self.a
                self.merged = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + x @ (self.b @ self.a).T


def test_a_module_whose_train_does_work_is_handed_back_as_it_came() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MergingLinear(), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    model[2].eval()  # a child in another mode than its parent
    x = torch.randn(16, 4)
    weight, before = model[0].base.weight.detach().clone(), model(x).detach()
    reluscope.analyze(model, x, device="cpu")
    assert model.training and model[0].training and not model[0].merged and not model[2].training
    assert torch.allclose(model[0].base.weight, weight, atol=1e-6)  # merged and unmerged: not merged
    assert torch.allclose(model(x), before)
