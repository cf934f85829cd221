"""Model files that would run code, and outputs that would destroy what they point at.

Model files are data unless --trust-checkpoint is given: a .pt2 is analysed only when its
members, weights, graph ops, symbolic expressions and generated-code names are known harmless
before torch reads it (reluscope/backends/torch/pt2_check.py); a TorchScript file is a program
and is refused. Every hostile file here is real: `test_*_payload_is_real` shows it runs its
payload when trusted (or when torch loads it directly), and the untrusted run through the real CLI
ends with exit 2, one line, the payload not run and nothing left behind.

Outputs: devices and FIFOs are written as streams, never replaced; symbolic links are refused;
an output that is an input (or the other output) is refused before the analysis; new reports get
the mode the umask gives.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from reluscope.backends.torch.pt2_check import _plain_expression, check_pt2
from reluscope.cli import app
from reluscope.errors import UnsafeCheckpointError

from conftest import ARCHITECTURES, CALIB, SAMPLES

MARKER = "PWNED"
runner = CliRunner()


# ---------------------------------------------------------------------------------------------- builders
def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None] = lambda n, d: d,
             add: dict[str, bytes] | None = None, rename: Callable[[str], str] = lambda n: n) -> None:
    """Copy a zip member by member: `change` may edit (or drop, returning None) a member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                info.filename = rename(info.filename)
                zout.writestr(info, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)


def _root(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()[0].split("/", 1)[0]


def _edit_program(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            edit(program)
            return json.dumps(program).encode()
        return data
    _rewrite(src, dst, change)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def pt2_with_aotinductor(work: Path, name: str = "aoti.pt2") -> None:
    """An AOTInductor package beside the exported program: torch.export.load would extract the
    .so and dlopen it (its constructors run), or compile the .cpp with the flags in the archive."""
    root = _root(SAMPLES / "digits_mlp.pt2")
    _rewrite(SAMPLES / "digits_mlp.pt2", work / name, add={
        f"{root}/data/aotinductor/model/model.so": b"\x7fELF" + bytes(60),
        f"{root}/data/aotinductor/model/model.cpp": b"int main() { return 0; }\n",
        f"{root}/data/aotinductor/model/model_compile_flags.json": b"{}"})


def pt2_with_uppercase_opaque(work: Path, name: str = "opaque.pt2") -> None:
    """An opaque constant (torch calls pickle.loads on it) stored as OPAQUE_OBJ_0: torch's zip
    reader finds members case-insensitively, so it reads this one for 'opaque_obj_0'."""
    root = _root(SAMPLES / "digits_mlp.pt2")
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}}}
    import pickle

    _rewrite(SAMPLES / "digits_mlp.pt2", work / name,
             lambda n, d: json.dumps(config).encode() if n.endswith("model_constants_config.json") else d,
             add={f"{root}/data/constants/OPAQUE_OBJ_0": pickle.dumps(_Payload(work / MARKER))})


class _WritesBytes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(4, dtype=torch.uint8)
        t.fill_(65)
        return torch.relu(self.fc(x.flatten(1))) + t.sum() * 0


def pt2_writing_a_file(work: Path, name: str = "writes.pt2", victim: Path | None = None) -> None:
    """A graph whose first node is aten.from_file(victim, shared=True) and whose next one fills
    it: the forward pass writes 'AAAA' into the victim file (a .pth in site-packages would run at
    the next Python start)."""
    victim = victim or work / MARKER
    plain = work / "plain_writes.pt2"
    torch.export.save(torch.export.export(_WritesBytes().eval(), (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), plain)

    def edit(program: dict[str, Any]) -> None:
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.zeros.default":
                dtype = next(a for a in node["inputs"] if a["name"] == "dtype")
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                                  {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                                  {"name": "size", "arg": {"as_int": 4}, "kind": 1}, dtype]
    _edit_program(plain, work / name, edit)
    plain.unlink()


def pt2_calling(target: str) -> Callable[[Path], None]:
    """The sample MLP with its first ReLU's target replaced (a custom op, a Python callable...)."""
    def build(work: Path, name: str = "calls.pt2") -> None:
        def edit(program: dict[str, Any]) -> None:
            node = next(n for n in program["graph_module"]["graph"]["nodes"] if "relu" in n["target"])
            node["target"] = target
        _edit_program(SAMPLES / "digits_mlp.pt2", work / name, edit)
    return build


def _dynamic_export(work: Path) -> Path:
    path = work / "dynamic.pt2"
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return path


def _touch(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def pt2_with_guard_code(work: Path, name: str = "guard.pt2") -> None:
    """guards_code is pasted into a function that exec() compiles and the forward pass calls."""
    _edit_program(SAMPLES / "digits_mlp.pt2", work / name,
                  lambda p: p.__setitem__("guards_code", [f"({_touch(work / MARKER)}) == 0"]))


def pt2_with_sympy_code(work: Path, name: str = "sympy.pt2") -> None:
    """Symbolic shapes are parsed with sympy.sympify, which eval()s the string."""
    source = _dynamic_export(work)
    text = json.dumps(json.loads(zipfile.ZipFile(source).read(f"{_root(source)}/models/model.json")))

    def edit(program: dict[str, Any]) -> None:
        def walk(item: Any) -> None:
            if isinstance(item, dict):
                if isinstance(item.get("expr_str"), str):
                    item["expr_str"] = _touch(work / MARKER)
                for child in item.values():
                    walk(child)
            elif isinstance(item, list):
                for child in item:
                    walk(child)
        walk(program)
    assert "expr_str" in text
    _edit_program(source, work / name, edit)
    source.unlink()


def pt2_with_code_in_arg_names(work: Path, name: str = "argnames.pt2") -> None:
    """forward_arg_names are pasted into `def forward(self, ...)`, which torch compiles."""
    def edit(program: dict[str, Any]) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"x={_touch(work / MARKER)}"]
    _edit_program(SAMPLES / "digits_mlp.pt2", work / name, edit)


class _Sentinel(nn.Module):
    """A TorchScript submodule whose __setstate__ (run inside torch.jit.load) writes a file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        # maps (creates) any file and writes it, from the file's own code
        written = int(torch.from_file(state[0], True, 4, dtype=torch.uint8).fill_(65).sum())
        self.marker = state[0]
        self.training = state[1] or written < 0


class _WithSentinel(nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.sentinel = _Sentinel(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.sentinel(x).flatten(1)))


def torchscript_with_setstate(work: Path, name: str = "stateful.torchscript") -> None:
    torch.jit.save(torch.jit.script(_WithSentinel(str(work / MARKER))), work / name)


# ---------------------------------------------------------------------------------------------- running
def run(args: list[str], cwd: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "reluscope", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, **kwargs)


def one_error_line(result: Any) -> str:
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code == 2, (code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def analyze_cli(model: Path, work: Path, *extra: str) -> Any:
    return runner.invoke(app, ["analyze", str(model), "--data", str(CALIB), "-o", str(work / "report.json"), *extra],
                         env={"NO_COLOR": "1", "COLUMNS": "200"})


HOSTILE_PT2 = {
    "aotinductor": (pt2_with_aotinductor, "AOTInductor package"),
    "uppercase-opaque": (pt2_with_uppercase_opaque, "pickled Python objects"),
    "from-file": (pt2_writing_a_file, "calls torch.ops.aten.from_file.default"),
    "custom-op": (pt2_calling("torch.ops.reluscope_evil.run.default"), "calls torch.ops.reluscope_evil.run.default"),
    "python-callable": (pt2_calling("torch._utils._import_dotted_name"), "calls torch._utils._import_dotted_name"),
    "builtin-callable": (pt2_calling("builtins.exec"), "calls builtins.exec"),
    "higher-order-op": (pt2_calling("torch.ops.higher_order.cond"), "calls torch.ops.higher_order.cond"),
    "guards-code": (pt2_with_guard_code, "guards_code"),
    "sympy-code": (pt2_with_sympy_code, "symbolic expression"),
    "arg-names": (pt2_with_code_in_arg_names, "forward_arg_names"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PT2))
def test_hostile_pt2_is_refused_before_torch_reads_it(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build, words = HOSTILE_PT2[case]
    build(tmp_path)
    path = next(tmp_path.glob("*.pt2"))
    before = sorted(os.listdir(tmp_path))
    loads: list[Any] = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: loads.append(a))  # must not even be reached
    line = one_error_line(analyze_cli(path, tmp_path))
    assert words in line and "--trust-checkpoint" in line, line
    assert line.startswith(f"error: refused to load {path}: ")
    assert not loads
    assert not (tmp_path / MARKER).exists()
    assert sorted(os.listdir(tmp_path)) == before  # no report, nothing extracted


# (arg-names: torch pastes the names verbatim into `def forward(self, ...)` and compiles it; a
# payload that also survives the second place it is pasted is left to the reader)
@pytest.mark.parametrize("case", ["uppercase-opaque", "from-file", "guards-code", "sympy-code"])
def test_hostile_pt2_payload_is_real(case: str, tmp_path: Path) -> None:
    """Trusted, the same files run their payload: the refusals above are not about harmless files."""
    build, _ = HOSTILE_PT2[case]
    build(tmp_path)
    path = next(tmp_path.glob("*.pt2"))
    runner.invoke(app, ["analyze", str(path), "--data", str(CALIB), "--trust-checkpoint", "-f", "json"])
    assert (tmp_path / MARKER).exists()


def test_uppercase_member_is_what_torch_reads() -> None:
    reader = torch._C.PyTorchFileReader(str(SAMPLES / "digits_mlp.pt2"))
    assert reader.get_record("MODELS/MODEL.JSON") == reader.get_record("models/model.json")


def test_hostile_pt2_run_as_a_process_leaves_no_temp_files(tmp_path: Path) -> None:
    pt2_with_aotinductor(tmp_path)
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "reluscope", "analyze", str(tmp_path / "aoti.pt2"), "--data", str(CALIB)],
        env={**os.environ, "TMPDIR": str(temp), "NO_COLOR": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True, text=True, timeout=240)
    assert "AOTInductor" in one_error_line(result)
    assert list(temp.iterdir()) == []


def test_member_layout_is_compared_case_insensitively(tmp_path: Path) -> None:
    root = _root(SAMPLES / "digits_mlp.pt2")
    twice = tmp_path / "twice.pt2"
    _rewrite(SAMPLES / "digits_mlp.pt2", twice,
             add={f"{root}/MODELS/model.json": zipfile.ZipFile(SAMPLES / "digits_mlp.pt2").read(f"{root}/models/model.json")})
    with pytest.raises(UnsafeCheckpointError, match="differ only in case"):
        check_pt2(twice)
    stray = tmp_path / "stray.pt2"
    _rewrite(SAMPLES / "digits_mlp.pt2", stray, add={f"{root}/data/executorch/model.pte": b"x"})
    with pytest.raises(UnsafeCheckpointError, match="not part of an exported program's layout"):
        check_pt2(stray)
    pickled = tmp_path / "pickled.pt2"
    _rewrite(SAMPLES / "digits_mlp.pt2", pickled, add={f"{root}/data/constants/Custom_Obj_0": b"x"})
    with pytest.raises(UnsafeCheckpointError, match="pickled Python objects"):
        check_pt2(pickled)


def test_sample_and_freshly_exported_models_pass(tmp_path: Path) -> None:
    """The allow-list is generous enough for ordinary networks, dynamic batch sizes included."""
    for path in sorted(SAMPLES.glob("*.pt2")):
        check_pt2(path)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.act(self.bn(self.conv(x)))
            out += x
            return nn.functional.gelu(out)

    class Zoo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), Block(),
                                      nn.MaxPool2d(2), nn.Upsample(scale_factor=2), nn.AvgPool2d(2),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1))
            self.embed = nn.Embedding(10, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.LeakyReLU(), nn.ELU(), nn.Hardswish(),
                                      nn.Mish(), nn.PReLU(), nn.ReLU6(), nn.Tanh(), nn.Sigmoid(), nn.Softplus(),
                                      nn.Linear(32, 10), nn.LogSoftmax(-1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(torch.arange(4).expand(x.shape[0], 4))
            attended, _ = self.attn(tokens, tokens, tokens)
            features = torch.cat([self.stem(x)[:, :32], attended.mean(1)], dim=1)
            return torch.softmax(self.head(features), -1).clamp(min=0)

    path = tmp_path / "zoo.pt2"
    program = torch.export.export(Zoo().eval(), (torch.randn(3, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    torch.export.save(program, path)
    check_pt2(path)
    result = runner.invoke(app, ["analyze", str(path), "--data", str(CALIB), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["format"] == "torch-export"
    dynamic = _dynamic_export(tmp_path)
    check_pt2(dynamic)


@pytest.mark.parametrize("text, plain", [
    ("Symbol('s31', positive=True, integer=True)", True),
    ("FloorDiv(Symbol('s0', integer=True), Integer(2))", True),
    ("s0*2 + 1 >= 4", True),
    ("Pow(Symbol('s0'), 2)", True),
    ("__import__('os').system('id')", False),
    ("Symbol('x').__class__", False),
    ("open('/etc/passwd')", False),
    ("exec('1')", False),
    ("Integer(2)**Integer(10)**Integer(10)", False),
    ("PowByNatural(2, 10000000000)", False),
    ("lambda: 1", False),
    ("[c for c in ()]", False),
])
def test_symbolic_expressions(text: str, plain: bool) -> None:
    assert _plain_expression(text) is plain


@pytest.mark.parametrize("text, plain", [
    ("L['x'].size()[0] == 3", True),
    ("L['x'].size()[1] >= 2 and math.isnan(L['y'])", True),
    ("L['x'].size()[0] == 3 or __import__('os')", False),
    ("L['x'].__class__", False),
    ("L['a\"b'].size()[0] == 1", False),
    ("print(1)", False),
])
def test_guard_expressions(text: str, plain: bool) -> None:
    assert _plain_expression(text, guard=True) is plain


# ---------------------------------------------------------------------------------------------- TorchScript
def test_torchscript_is_refused_without_trust(tmp_path: Path) -> None:
    torchscript_with_setstate(tmp_path)
    assert not (tmp_path / MARKER).exists()  # saving ran nothing
    path = tmp_path / "stateful.torchscript"
    line = one_error_line(analyze_cli(path, tmp_path))
    assert line.startswith(f"error: refused to load {path}: a TorchScript file is a program")
    assert "--trust-checkpoint" in line
    assert not (tmp_path / MARKER).exists()
    assert not (tmp_path / "report.json").exists()
    # refused before --data is read: a missing data file does not change the answer
    result = runner.invoke(app, ["analyze", str(path), "--data", str(tmp_path / "missing.npz")])
    assert "a TorchScript file is a program" in one_error_line(result)
    assert not (tmp_path / MARKER).exists()


def test_torchscript_payload_is_real(tmp_path: Path) -> None:
    torchscript_with_setstate(tmp_path)
    if (tmp_path / MARKER).exists():
        (tmp_path / MARKER).unlink()
    torch.jit.load(str(tmp_path / "stateful.torchscript"))
    assert (tmp_path / MARKER).exists()


def test_torchscript_loads_when_trusted() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "digits_mlp.torchscript"), "--data", str(CALIB),
                                 "--trust-checkpoint", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["format"] == "torchscript"


# ---------------------------------------------------------------------------------------------- outputs
ONNX = SAMPLES / "digits_mlp.onnx"


def test_fifo_output_is_written_as_a_stream(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as handle:
            received.append(handle.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    result = run(["analyze", str(ONNX), "--data", str(CALIB), "-f", "json", "-o", str(fifo), "--quiet"])
    reader.join(30)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a FIFO
    assert json.loads(received[0])["model"]["format"] == "onnx"
    assert sorted(os.listdir(tmp_path)) == ["pipe.json"]


def test_fifo_output_without_a_reader_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    result = run(["analyze", str(ONNX), "--data", str(CALIB), "-f", "json", "-o", str(fifo)])
    assert "it is a pipe that no process reads" in one_error_line(result)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dev_null_and_dev_stdout_are_streams(tmp_path: Path) -> None:
    before = os.stat("/dev/null")
    result = run(["analyze", str(ONNX), "--data", str(CALIB), "-f", "json", "-o", "/dev/null", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_ino == before.st_ino
    assert result.stdout == ""
    shown = run(["analyze", str(ONNX), "--data", str(CALIB), "-f", "json", "-o", "/dev/stdout", "--quiet"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["model"]["format"] == "onnx"
    # stdout redirected to a file: the report lands in it
    with open(tmp_path / "captured.json", "w") as handle:
        redirected = subprocess.run([sys.executable, "-m", "reluscope", "analyze", str(ONNX), "--data", str(CALIB),
                                     "-f", "json", "-o", "/dev/stdout", "--quiet"], stdout=handle,
                                    stderr=subprocess.PIPE, text=True, timeout=240,
                                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert redirected.returncode == 0, redirected.stderr
    assert json.loads((tmp_path / "captured.json").read_text())["model"]["format"] == "onnx"


@pytest.mark.parametrize("target", ["existing", "dangling"])
def test_symlink_output_is_refused(target: str, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    if target == "existing":
        real.write_text("keep me\n")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    line = one_error_line(analyze_cli(ONNX, tmp_path, "-o", str(link)))
    assert line.startswith(f"error: cannot write {link}: it is a symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real.read_text() == "keep me\n") if target == "existing" else not real.exists()


def _model_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "model.onnx"
    shutil.copy(ONNX, copy)
    return copy


def test_output_equal_to_an_input_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_copy(tmp_path)
    data = tmp_path / "calib.npz"
    shutil.copy(CALIB, data)
    arch = tmp_path / "arch.py"
    shutil.copy(ARCHITECTURES, arch)
    state = tmp_path / "mlp.pt"
    shutil.copy(SAMPLES / "digits_mlp.pt", state)
    monkeypatch.chdir(tmp_path)
    cases = [
        (["analyze", "model.onnx", "--data", "calib.npz", "-o", "model.onnx"], "-o model.onnx is the model"),
        (["analyze", "model.onnx", "--data", "calib.npz", "-o", "./calib.npz"], "-o calib.npz is --data"),
        (["analyze", "mlp.pt", "--arch", "arch.py:digits_mlp", "--data", "calib.npz", "-o", "arch.py"],
         "-o arch.py is --arch"),
        (["analyze", "model.onnx", "--data", "calib.npz", "--junit", str(model)], "--junit"),
        (["analyze", "model.onnx", "--data", "calib.npz", "-o", "r.xml", "--junit", "./r.xml"],
         "--junit r.xml is the same file as -o r.xml"),
    ]
    saved = {p: p.read_bytes() for p in (model, data, arch, state)}
    for args, words in cases:
        line = one_error_line(runner.invoke(app, args))
        assert words in line, line
        assert {p: p.read_bytes() for p in saved} == saved
        assert not (tmp_path / "r.xml").exists()


def test_diff_output_equal_to_an_input_is_refused(tmp_path: Path) -> None:
    report = tmp_path / "base.json"
    made = runner.invoke(app, ["analyze", str(ONNX), "--data", str(CALIB), "-f", "json", "-o", str(report)])
    assert made.exit_code == 0, made.output
    saved = report.read_bytes()
    line = one_error_line(runner.invoke(app, ["diff", str(report), str(report), "-o", str(report)]))
    assert "is BASE" in line
    assert report.read_bytes() == saved


def test_reports_get_the_mode_the_umask_gives(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "report.json"
        junit = tmp_path / "gates.xml"
        result = runner.invoke(app, ["analyze", str(ONNX), "--data", str(CALIB), "-o", str(out), "--junit", str(junit),
                                     "--fail-on", "dead_fraction>0.99"])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE(junit.stat().st_mode) == 0o644
        os.umask(0o077)
        fresh = tmp_path / "private.json"
        assert runner.invoke(app, ["analyze", str(ONNX), "--data", str(CALIB), "-o", str(fresh)]).exit_code == 0
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
        out.chmod(0o640)  # a replaced report keeps the mode its owner gave it
        assert runner.invoke(app, ["analyze", str(ONNX), "--data", str(CALIB), "-o", str(out)]).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
    finally:
        os.umask(old)
