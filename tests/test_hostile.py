"""Hostile and broken inputs (issue 7).

Every bad input ends in exit code 2 and one line on stderr: no traceback (unless --debug), no
report file left behind. Pickled code in a model or data file never runs. NaN/Inf are counted,
not crashed on. The model and torch's global state are handed back also after a failure midway.

docs/errors.md is the user-facing table of these cases. `test_documented_error` runs every row
of that table that names it, building the row's input files from CASES below, and checks the
exit code and the exact message of the row: the table cannot drift from what the tool prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope.cli import app
from reluscope.errors import InputError, ModelRunError, UnsafeCheckpointError

from conftest import ARCHITECTURES, CALIB, REPO, SAMPLES, global_hook_state, module_hook_state
from test_outputs_hostile import EXTRA_CASES
from test_resources import RESOURCE_CASES
from test_untrusted import (pt2_calling, pt2_with_aotinductor, pt2_with_guard_code, pt2_with_uppercase_opaque,
                            pt2_writing_a_file, torchscript_with_setstate)

DOCS = REPO / "docs" / "errors.md"
MARKER = "PWNED"  # the file every payload below would create


# ---------------------------------------------------------------------------------------------- payloads
class Payload:
    """Unpickling this runs `touch <marker>`: the marker file appears if code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def torch_save_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], bytes],
                add: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))
        for name, data in (add or {}).items():
            zout.writestr(name, data)


def pt2_with_pickled_weight(src: Path, dst: Path, marker: Path) -> None:
    """A torch.export archive whose weight config marks one weight `use_pickle`, and that weight
    a pickle that runs code: torch.export.load unpickles it with weights_only=False (torch 2.13)."""
    with zipfile.ZipFile(src) as archive:
        config_name = next(n for n in archive.namelist() if n.endswith("weights/model_weights_config.json"))
        config = json.loads(archive.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    weight = f"{config_name.rsplit('/', 1)[0]}/{first['path_name']}"
    payload = torch_save_bytes(Payload(marker))
    rewrite_zip(src, dst, lambda name, data: json.dumps(config).encode() if name == config_name
                else payload if name == weight else data)


def pt2_with_pickled_sample_inputs(src: Path, dst: Path, marker: Path) -> None:
    """Sample inputs that fail weights_only: torch retries them with weights_only=False."""
    payload = torch_save_bytes(Payload(marker))
    rewrite_zip(src, dst, lambda name, data: payload if name.endswith("sample_inputs/model.pt") else data)


def pt2_with_opaque_constant(src: Path, dst: Path, marker: Path) -> None:
    """An "opaque object" constant: torch.export.load calls pickle.loads on it."""
    from torch.export.pt2_archive.constants import CONSTANTS_DIR, OPAQUE_OBJ_FILENAME_PREFIX

    with zipfile.ZipFile(src) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
    name = OPAQUE_OBJ_FILENAME_PREFIX + "0"
    config = {"config": {"evil": {"path_name": name, "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    rewrite_zip(src, dst, lambda n, data: json.dumps(config).encode() if n.endswith("model_constants_config.json")
                else data, add={f"{root}/{CONSTANTS_DIR}{name}": pickle.dumps(Payload(marker))})


# ---------------------------------------------------------------------------------------------- the cases
def _x(count: int = 10) -> np.ndarray:
    with np.load(CALIB) as archive:
        return archive["x"][:count].copy()


def _write_payload_checkpoint(work: Path) -> None:
    torch.save({"weights": torch.zeros(2), "extra": Payload(work / MARKER)}, work / "payload.pt")


def _write_raw_pickle(work: Path) -> None:
    (work / "payload.pkl").write_bytes(pickle.dumps(Payload(work / MARKER), protocol=2))


def _write_payload_data(work: Path) -> None:
    torch.save({"x": torch.from_numpy(_x()), "meta": Payload(work / MARKER)}, work / "payload_data.pt")


def _write_truncated(name: str, source: str) -> Callable[[Path], None]:
    def write(work: Path) -> None:
        data = (SAMPLES / source).read_bytes()
        (work / name).write_bytes(data[: len(data) // 2])
    return write


def _write_random(work: Path) -> None:
    data = np.random.default_rng(0).bytes(4096)
    assert not data.startswith((b"PK", b"\x80"))  # neither a zip nor a pickle: the ONNX loader's turn
    (work / "random.bin").write_bytes(data)


def _write_fifo(work: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(work / "pipe.pt")


def _write_symlink_loop(work: Path) -> None:
    os.symlink("loop_b.pt", work / "loop_a.pt")
    os.symlink("loop_a.pt", work / "loop_b.pt")


def _write_raising_arch(work: Path) -> None:
    (work / "broken_arch.py").write_text("def build():\n    raise RuntimeError('weights for 1000 classes expected')\n")


def _write_npz(name: str, **arrays: Any) -> Callable[[Path], None]:
    def write(work: Path) -> None:
        np.savez(work / name, **{k: v() if callable(v) else v for k, v in arrays.items()})
    return write


def _write_objects(work: Path) -> None:
    np.savez(work / "objects.npz", x=np.array([{"pixels": 1}, None, 3], dtype=object))


def _write_huge_header(work: Path) -> None:
    """An .npy whose header declares 10**12 float32 (4 TB) over 64 bytes of data."""
    from numpy.lib import format as npy_format

    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    (work / "huge.npy").write_bytes(buffer.getvalue() + b"\0" * 64)


def _nan_x() -> np.ndarray:
    x = _x()
    x[0, 0, 0, 0] = np.nan
    x[1, 0, 3, 3] = np.inf
    x[2, 0, 5, 1] = -np.inf
    return x


def _skip_with_cuda(work: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")


def _write_blocker(work: Path) -> None:
    (work / "notes.txt").write_text("not a folder\n")


def _nothing(work: Path) -> None:
    pass


def _write_two_input_onnx(work: Path) -> None:
    """A graph taking `input` and `state` (as recurrent models do), and data that names `input` and `h` only."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["input", "state"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
                              "two_inputs", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4])
                                             for n in ("input", "state")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), work / "two_inputs.onnx")
    np.savez(work / "no_state.npz", input=np.zeros((10, 4), np.float32), h=np.zeros((10, 4), np.float32))
# Model and data formats of issue 16 (Hugging Face folders, texts, safetensors, training checkpoints)
def _hf_folder(work: Path, *, tokenizer: bool = True) -> Path:
    from test_hf import build_hf_folder  # skips the case where transformers is not installed

    build_hf_folder(work / "tiny-bert", tokenizer=tokenizer)
    (work / "texts.txt").write_text("the cat sat on the mat\na dog\n")
    return work / "tiny-bert"


def _write_fake_transformers(work: Path) -> None:
    """A folder where `import transformers` fails, as where the extra is not installed (the command
    runs as `python -m reluscope` in this folder, which puts it first on sys.path)."""
    _hf_folder(work)
    (work / "transformers.py").write_text("raise ImportError('No module named transformers')\n")


def _write_hf_without_weights(work: Path) -> None:
    (_hf_folder(work) / "model.safetensors").unlink()


def _write_hf_with_custom_code(work: Path) -> None:
    config_path = _hf_folder(work) / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    config_path.write_text(json.dumps(config))


def _write_texts(work: Path) -> None:
    (work / "texts.txt").write_text("the cat sat on the mat\n")


def _write_jsonl_without_text(work: Path) -> None:
    _hf_folder(work)
    (work / "texts.jsonl").write_text('{"sentence": "the cat sat"}\n')


def _mlp_sd() -> dict[str, torch.Tensor]:
    return torch.load(SAMPLES / "digits_mlp.pt", weights_only=True)


def _write_truncated_safetensors(work: Path) -> None:
    from test_checkpoints import write_safetensors

    write_safetensors(work / "model.safetensors", _mlp_sd())
    data = (work / "model.safetensors").read_bytes()
    (work / "model.safetensors").write_bytes(data[: len(data) // 2])


def _write_shards(work: Path, *, index: bool = True, drop: str | None = None) -> None:
    from test_checkpoints import write_safetensors

    sd = _mlp_sd()
    names = list(sd)
    weight_map = {}
    for i in range(2):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(work / shard, {name: sd[name] for name in names[i::2]})
        weight_map.update({name: shard for name in names[i::2]})
    if index:
        (work / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if drop:
        (work / drop).unlink()


def _write_mismatched_checkpoint(work: Path) -> None:
    sd = _mlp_sd()
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save({"model_state": sd, "epoch": 3}, work / "run.ckpt")


def _write_main_pickle(work: Path) -> None:
    (work / "train.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n    pass\n"
                                   "torch.save(Net(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU()), "
                                   "'net.pt')\n")
    subprocess.run([sys.executable, "train.py"], cwd=work, check=True, capture_output=True)


def _write_fixed_batch_pt2(work: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reluscope_case_arch", ARCHITECTURES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.digits_mlp()
    model.load_state_dict(_mlp_sd())
    torch.export.save(torch.export.export(model.eval(), (torch.zeros(4, 1, 8, 8),)), work / "fixed4.pt2")


def _write_digit_images(work: Path) -> None:
    """A folder of 8x8 grayscale PNGs: the first calibration digits as 0..255 pixels."""
    from PIL import Image

    (work / "images").mkdir()
    for i, digit in enumerate(_x()[:4, 0]):
        Image.fromarray((digit * 255).round().astype(np.uint8), mode="L").save(work / "images" / f"{i}.png")


@dataclass(frozen=True)
class Case:
    setup: Callable[[Path], None]
    subprocess: bool = False  # run as a real process: a regression here would kill the test process
    unset: tuple[str, ...] = ()  # environment variables the command runs without


CASES: dict[str, Case] = {
    "pickle-checkpoint": Case(_write_payload_checkpoint),
    "pickle-legacy": Case(_write_raw_pickle),
    "pickle-pt2": Case(lambda w: pt2_with_pickled_weight(SAMPLES / "digits_mlp.pt2", w / "payload.pt2", w / MARKER)),
    "pickle-data": Case(_write_payload_data),
    # a real process: torch warns about the pickle protocol, and Python warnings must not reach stderr
    "damaged-pickle": Case(lambda w: (w / "damaged.pt").write_bytes(b"\x80\x04\x95" + bytes(range(200))),
                           subprocess=True),
    "missing-file": Case(_nothing),
    "folder": Case(lambda w: (w / "models").mkdir()),
    "empty-file": Case(lambda w: (w / "empty.pt").write_bytes(b"")),
    "random-bytes": Case(_write_random),
    "truncated-zip": Case(_write_truncated("truncated.pt", "digits_mlp.pt")),
    "truncated-onnx": Case(_write_truncated("truncated.onnx", "digits_mlp.onnx")),
    "fifo": Case(_write_fifo),
    "symlink-loop": Case(_write_symlink_loop),
    "unknown-arch": Case(_nothing),
    "arch-raises": Case(_write_raising_arch),
    "shape-state-dict": Case(_write_npz("rgb32.npz", x=np.zeros((10, 3, 32, 32), np.float32))),
    "shape-torchscript": Case(_write_npz("rgb32.npz", x=np.zeros((10, 3, 32, 32), np.float32)), subprocess=True),
    "shape-export": Case(_write_npz("rgb32.npz", x=np.zeros((10, 3, 32, 32), np.float32))),
    "shape-onnx": Case(_write_npz("rgb32.npz", x=np.zeros((10, 3, 32, 32), np.float32))),
    "text-data": Case(_write_npz("text.npz", x=np.array([["cat", "dog"]] * 10))),
    "complex-data": Case(_write_npz("complex.npz", x=np.zeros((10, 1, 8, 8), np.complex64))),
    "object-data": Case(_write_objects),
    "integer-data": Case(_write_npz("pixels.npz", x=lambda: (_x() * 16).astype(np.uint8))),
    "empty-data": Case(_write_npz("empty.npz", x=np.zeros((0, 1, 8, 8), np.float32))),
    "labels-mismatch": Case(_write_npz("labels.npz", x=_x, y=np.zeros(7, np.int64))),
    "labels-out-of-range": Case(_write_npz("labels.npz", x=_x, y=np.arange(10, 20))),
    "huge-header": Case(_write_huge_header),
    "cuda-no-gpu": Case(_skip_with_cuda),
    # without the Triton interpreter that conftest.py switches on for the kernel's own tests
    "triton-no-gpu": Case(_skip_with_cuda, subprocess=True, unset=("TRITON_INTERPRET",)),
    "output-under-file": Case(_write_blocker),
    "output-is-folder": Case(lambda w: (w / "reports").mkdir()),
    "nan-data": Case(_write_npz("nan.npz", x=_nan_x)),
    "torchscript-untrusted": Case(torchscript_with_setstate),
    "pt2-aotinductor": Case(pt2_with_aotinductor),
    "pt2-opaque-uppercase": Case(pt2_with_uppercase_opaque),
    "pt2-from-file": Case(pt2_writing_a_file),
    "pt2-custom-op": Case(pt2_calling("torch.ops.reluscope_evil.run.default")),
    "pt2-guards-code": Case(pt2_with_guard_code),
    "output-is-model": Case(_nothing),
    "junit-is-output": Case(_nothing),
    "output-symlink": Case(lambda w: os.symlink("old.json", w / "latest.json")),
    "onnx-missing-input": Case(_write_two_input_onnx),
    "prune-no-output": Case(_nothing),
    "prune-suffix": Case(_nothing),
    "prune-compiled": Case(_nothing),
    # names, writes, hung models, exit 3 -> exit 2, config files: built in test_outputs_hostile.py
    **{name: Case(setup, subprocess=real) for name, (setup, real) in EXTRA_CASES.items()},
    # sizes checked before allocating, casts that lose range: built in test_resources.py
    **{name: Case(setup, subprocess=real) for name, (setup, real) in RESOURCE_CASES.items()},
    "hf-no-transformers": Case(_write_fake_transformers, subprocess=True),
    "hf-no-weights": Case(_write_hf_without_weights),
    "hf-no-tokenizer": Case(lambda w: _hf_folder(w, tokenizer=False) and None),
    "hf-custom-code": Case(_write_hf_with_custom_code),
    "text-data-no-tokenizer": Case(_write_texts),
    "jsonl-no-text": Case(_write_jsonl_without_text),
    "max-length": Case(_hf_folder),
    "safetensors-truncated": Case(_write_truncated_safetensors),
    "shard-without-index": Case(lambda w: _write_shards(w, index=False)),
    "shard-missing": Case(lambda w: _write_shards(w, drop="model-00002-of-00002.safetensors")),
    "checkpoint-mismatch": Case(_write_mismatched_checkpoint),
    "pickled-main": Case(_write_main_pickle),
    "pt2-fixed-batch-gradients": Case(_write_fixed_batch_pt2),
    "normalize-unknown": Case(_nothing),
    "normalize-channels": Case(_write_digit_images),
    "normalize-not-images": Case(_nothing),
}


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    case: str
    command: str
    exit_code: int
    message: str
    test: str


def _cell(text: str) -> str:
    text = text.strip()
    return text[1:-1] if text.startswith("`") and text.endswith("`") else text


def documented_rows() -> list[Row]:
    """The rows of the table in docs/errors.md: | case | bad input | command | exit | message | test |."""
    rows = []
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")] if line.startswith("| ") else []
        if len(cells) != 6 or not cells[0].startswith("`") or not cells[3].isdigit():
            continue  # prose, the header or the separator
        rows.append(Row(_cell(cells[0]), _cell(cells[2]), int(cells[3]), _cell(cells[4]), _cell(cells[5])))
    return rows


ROWS = documented_rows() if DOCS.is_file() else []
RUN_HERE = [row for row in ROWS if row.test == f"test_hostile.py::test_documented_error[{row.case}]"]


def message_pattern(message: str) -> re.Pattern[str]:
    """The documented message as a pattern: `…` stands for text that varies (times, counts)."""
    return re.compile(".*?".join(re.escape(part) for part in message.split("…")), re.DOTALL)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the sample models and calibration data under short names, as the current folder."""
    for name in ("digits_mlp.pt", "digits_mlp.pt2", "digits_mlp.onnx", "digits_cnn.torchscript"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    shutil.copy(ARCHITECTURES, tmp_path / "architectures.py")
    shutil.copy(CALIB, tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def fifo_watchdog(folder: Path, seconds: float = 20.0) -> Iterator[None]:
    """After `seconds`, opens every FIFO in `folder` for writing: a reader stuck in open() on one
    is released, and the test fails on its elapsed time instead of hanging the run."""
    def release() -> None:
        for path in folder.iterdir():
            if path.is_fifo():
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass  # nobody waiting on it

    timer = threading.Timer(seconds, release)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


runner = CliRunner()


def run_cli(args: list[str], cwd: Path, env: dict[str, str], *, in_subprocess: bool = False) -> Outcome:
    if in_subprocess:
        proc = subprocess.run([sys.executable, "-m", "reluscope", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=180)
        return Outcome(proc.returncode, proc.stdout, proc.stderr)
    result = runner.invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(outcome: Outcome, workdir: Path | None = None) -> str:
    """Exit 2, nothing on stdout, one `error:` line on stderr, no traceback, no report left behind."""
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.stderr
    assert outcome.stdout == ""
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    if workdir is not None:
        assert not [n for n in os.listdir(workdir) if n == "report.json" or n.startswith(".report.json.")]
    return lines[0]


# ---------------------------------------------------------------------------------------------- docs/errors.md
def test_the_table_documents_every_case_and_names_real_tests() -> None:
    assert DOCS.is_file(), "docs/errors.md is missing"
    assert ROWS, "no table rows found in docs/errors.md"
    assert len({row.case for row in ROWS}) == len(ROWS), "duplicate case names in the table"
    assert set(CASES) <= {row.case for row in RUN_HERE}, "a case of this file is not in docs/errors.md"
    for row in ROWS:
        path, _, name = row.test.partition("::")
        assert path == "test_hostile.py", row
        function = name.split("[", 1)[0]
        assert callable(globals().get(function)) and function.startswith("test_"), row
        if function == "test_documented_error":
            assert row.case in CASES, row


@pytest.mark.parametrize("row", RUN_HERE, ids=[row.case for row in RUN_HERE])
def test_documented_error(row: Row, workdir: Path, cli_env: dict[str, str]) -> None:
    """One row of docs/errors.md: its command, run on its input, gives its exit code and message."""
    case = CASES[row.case]
    case.setup(workdir)
    args = shlex.split(row.command)
    given = {}  # `NAME=value reluscope ...`: the command runs with NAME set
    while args and "=" in args[0] and args[0] != "reluscope":
        name, _, value = args.pop(0).partition("=")
        given[name] = value
    assert args[0] == "reluscope"
    assert not given or case.subprocess, "a row that sets variables runs as a real process"
    started = time.monotonic()
    with fifo_watchdog(workdir):
        env = {key: value for key, value in {**cli_env, **given}.items() if key not in case.unset}
        outcome = run_cli(args[1:], workdir, {**env, "COLUMNS": "200"}, in_subprocess=case.subprocess)
    assert time.monotonic() - started < 20, "the command blocked"
    assert not (workdir / MARKER).exists(), "code from a file ran"
    pattern = message_pattern(row.message)
    if row.exit_code == 0:
        assert outcome.code == 0, outcome
        assert "Traceback" not in outcome.stdout + outcome.stderr
        assert pattern.search(outcome.stderr), (row.message, outcome.stderr)
    else:
        assert outcome.code == row.exit_code, outcome
        line = assert_one_line_error(outcome, workdir)
        assert pattern.fullmatch(line), f"\ndocumented: {row.message}\nactual:     {line}"


def test_debug_shows_the_traceback_then_the_line(workdir: Path) -> None:
    CASES["shape-state-dict"].setup(workdir)
    args = ["analyze", "digits_mlp.pt", "--arch", "architectures.py:digits_mlp", "--data", "rgb32.npz",
            "-o", "report.json"]
    plain = run_cli(args, workdir, {})
    line = assert_one_line_error(plain, workdir)
    debug = run_cli([*args, "--debug"], workdir, {})
    assert debug.code == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "mat1 and mat2 shapes cannot be multiplied" in debug.stderr  # the model's own error, chained
    assert debug.stderr.strip().splitlines()[-1] == line  # and the same one line last
    assert not (workdir / "report.json").exists()


# ---------------------------------------------------------------------------------------------- pickles
def test_the_payloads_are_real(workdir: Path) -> None:
    """Proof that the payloads above would run: trusted, or loaded without weights_only, they do."""
    _write_payload_checkpoint(workdir)
    trusted = run_cli(["analyze", "payload.pt", "--arch", "architectures.py:digits_mlp", "--data", "calib.npz",
                       "--trust-checkpoint"], workdir, {})
    assert trusted.code == 2  # it holds no model, but unpickling it ran the payload
    assert (workdir / MARKER).exists()
    (workdir / MARKER).unlink()
    pt2_with_pickled_weight(SAMPLES / "digits_mlp.pt2", workdir / "payload.pt2", workdir / MARKER)
    run_cli(["analyze", "payload.pt2", "--data", "calib.npz", "--trust-checkpoint"], workdir, {})
    assert (workdir / MARKER).exists()
    (workdir / MARKER).unlink()
    _write_payload_data(workdir)
    torch.load(workdir / "payload_data.pt", weights_only=False)
    assert (workdir / MARKER).exists()


@pytest.mark.parametrize("build", [pt2_with_pickled_weight, pt2_with_pickled_sample_inputs, pt2_with_opaque_constant],
                         ids=["pickled-weight", "pickled-sample-inputs", "opaque-constant"])
def test_torch_export_archives_with_pickles_are_refused(build: Callable[..., None], tmp_path: Path) -> None:
    """torch.export.load itself unpickles parts of a .pt2 with weights_only=False or pickle.loads."""
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pt2"
    build(SAMPLES / "digits_mlp.pt2", path, marker)
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        reluscope.analyze(path, torch.from_numpy(_x()))
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch was put back
    assert reluscope.analyze(SAMPLES / "digits_mlp.pt2", torch.from_numpy(_x())).model["format"] == "torch-export"


def test_object_arrays_in_npy_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="arrays of Python objects"):
        reluscope.analyze(nn.Sequential(nn.ReLU()), tmp_path / "objects.npy")


# ------------------------------------------------------------------------------------ files that are not files
def test_fifo_as_data_is_refused_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "data.npy")
    started = time.monotonic()
    with fifo_watchdog(tmp_path, seconds=10), pytest.raises(InputError, match="not a regular file"):
        reluscope.analyze(nn.Sequential(nn.ReLU()), tmp_path / "data.npy")
    assert time.monotonic() - started < 10


def test_symlink_loop_as_data(tmp_path: Path) -> None:
    os.symlink("b.npy", tmp_path / "a.npy")
    os.symlink("a.npy", tmp_path / "b.npy")
    with pytest.raises(InputError, match="symbolic links"):
        reluscope.analyze(nn.Sequential(nn.ReLU()), tmp_path / "a.npy")


def test_devices_are_not_read(tmp_path: Path) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    with pytest.raises(InputError, match="not a regular file"):
        reluscope.analyze(Path("/dev/zero"), torch.zeros(2, 4))
    with pytest.raises(InputError, match="not a regular file"):
        reluscope.analyze(nn.Sequential(nn.ReLU()), Path("/dev/zero"))


def test_huge_header_in_npz_is_refused_before_allocating(tmp_path: Path) -> None:
    from numpy.lib import format as npy_format

    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"declares an array of shape \(1000000, 1000000\).*8\.0 TB"):
        reluscope.analyze(nn.Sequential(nn.ReLU()), tmp_path / "huge.npz")
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------- shapes and dtypes
def _digits_cnn() -> nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reluscope_test_architectures", ARCHITECTURES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.digits_cnn()


def test_wrong_channels_name_the_first_layer(clean_global_state: None) -> None:
    with pytest.raises(ModelRunError) as info:
        reluscope.analyze(_digits_cnn(), torch.zeros(4, 3, 8, 8))
    message = str(info.value)
    assert "input shape (4, 3, 8, 8); its first layer conv1 (Conv2d) takes 1 input channels" in message
    assert "expected input[4, 3, 8, 8] to have 1 channels" in message  # the model's own words


def test_a_fitting_shape_gets_no_hint() -> None:
    """A model error that has nothing to do with the input shape is quoted without a guess."""
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("checkpoint expects a tokenizer")

    with pytest.raises(ModelRunError) as info:
        reluscope.analyze(Fails(), torch.zeros(2, 4))
    assert "(input shape (2, 4)): checkpoint expects a tokenizer. Check that" in str(info.value)


def test_torchscript_error_quotes_the_error_not_the_banner() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(64, 8), nn.ReLU()))
    with pytest.raises(ModelRunError) as info:
        reluscope.analyze(scripted, torch.zeros(4, 3))
    message = str(info.value)
    assert "TorchScript interpreter" not in message
    assert "its first layer 0 (Linear) takes 64 input features" in message
    assert "mat1 and mat2 shapes cannot be multiplied (4x3 and 64x8)" in message


def test_integer_inputs_are_cast_for_float_models() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
    pixels = torch.from_numpy((_x() * 16).astype(np.uint8))
    report = reluscope.analyze(model, pixels)
    expected = reluscope.analyze(model, pixels.float())
    assert report.layers == expected.layers
    assert sum("calibration input is uint8, the model computes in float32: cast" in w for w in report.warnings) == 1
    half = reluscope.analyze(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).double(), torch.ones(3, 4))
    assert any("calibration input is float32, the model computes in float64: cast" in w for w in half.warnings)
    # float64 (numpy's default) for a float32 model is cast without a word while every value fits
    # (docs/errors.md: a warning only when a value is beyond float32's range) ...
    wide = reluscope.analyze(model, pixels.double().numpy())
    assert wide.layers == expected.layers
    assert not [w for w in wide.warnings if "float64" in w]
    # ... and a float64 model gets float64 data as it is (it was rounded to float32 and cast back)
    seen: list[torch.dtype] = []
    double = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).double()
    double[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    report = reluscope.analyze(double, np.ones((3, 4)))
    assert not report.warnings and seen == [torch.float64]


def test_token_ids_stay_integers_for_embedding_models() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.ReLU())
    report = reluscope.analyze(model, torch.randint(0, 50, (6, 5)))
    assert report.data["samples"] == 6 and report.layers[0]["units"] == 8
    assert not any("cast" in w for w in report.warnings)


def test_bool_inputs_become_zeros_and_ones() -> None:
    mask = torch.rand(5, 4) > 0.5
    report = reluscope.analyze(nn.Sequential(nn.ReLU()), mask)
    assert report.layers[0]["zero_fraction"] == pytest.approx(1 - mask.float().mean().item())
    assert not report.warnings  # booleans are read as 0.0/1.0 when the data is read, silently


def test_complex_tensors_are_refused() -> None:
    with pytest.raises(InputError, match="complex numbers"):
        reluscope.analyze(nn.Sequential(nn.ReLU()), torch.zeros(3, 4, dtype=torch.complex64))


# ---------------------------------------------------------------------------------------------- NaN and Inf
class MakesNonFinite(nn.Module):
    """log of negative inputs: NaN; 1/0: Inf; both flow into ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(1.0 / self.act1(torch.log(x)))


@pytest.mark.parametrize("form", ["eager", "torchscript"])
def test_nonfinite_values_made_inside_the_model_are_counted(form: str, clean_global_state: None) -> None:
    x = torch.tensor([[-1.0, 1.0, 2.0, 0.5], [3.0, -2.0, 1.0, 4.0]])  # log: NaN, 0, +, -; 1/relu(0) = inf
    with torch.no_grad():
        a1 = torch.relu(torch.log(x))
        a2 = torch.relu(1.0 / a1)
    model = MakesNonFinite() if form == "eager" else torch.jit.script(MakesNonFinite())
    report = reluscope.analyze(model, x)
    json.loads(report.to_json())  # serialisable: no NaN in the report itself
    counted = {layer["name"]: layer["nonfinite"] for layer in report.layers}
    assert counted == {"act1": int((~torch.isfinite(a1)).sum()), "act2": int((~torch.isfinite(a2)).sum())}
    assert counted["act1"] == 2 and counted["act2"] >= 3
    assert report.summary["nonfinite"] == sum(counted.values())
    finite = a2[torch.isfinite(a2)]
    assert report.layer("act2")["max"] == pytest.approx(finite.max().item())


def test_huge_finite_activations_are_reported() -> None:
    x = torch.full((4, 3), 1e30)
    report = reluscope.analyze(nn.Sequential(nn.ReLU()), x)
    payload = json.loads(report.to_json())
    layer = payload["layers"][0]
    assert layer["nonfinite"] == 0
    assert layer["mean"] == pytest.approx(1e30, rel=1e-6) and layer["max"] == pytest.approx(1e30, rel=1e-6)


# ------------------------------------------------------------------------------------ handed back after a failure
def _flags(model: nn.Module) -> dict[str, Any]:
    return {"training": {n: m.training for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            "hooks": module_hook_state(model)}


def _assert_same(before: dict[str, Any], model: nn.Module) -> None:
    after = _flags(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for name, grad in before["grad"].items():
        now = after["grad"][name]
        assert (grad is None and now is None) or torch.equal(grad, now), name
    assert all(v == 0 for v in global_hook_state().values())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class Classifier(nn.Module):
    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 10)
        self.fail_on_call = fail_on_call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.act(self.drop(self.fc1(x.flatten(1))))
        if self.calls == self.fail_on_call:
            raise RuntimeError("out of luck on this batch")
        return self.head(h)


def _prepared(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    model.fc1.weight.requires_grad_(False)  # a frozen layer
    model.head.bias.grad = torch.full_like(model.head.bias, 3.0)  # a gradient the user accumulated
    model.head.register_forward_hook(lambda m, i, o: None)
    return model


def test_gradients_forward_raising_midway_hands_everything_back(clean_global_state: None) -> None:
    model = _prepared(Classifier(fail_on_call=2))
    before = _flags(model)
    x = torch.from_numpy(_x(64))
    with pytest.raises(ModelRunError, match="out of luck on this batch"):
        reluscope.analyze(model, [(x[:32], torch.zeros(32, dtype=torch.long)), (x[32:], torch.ones(32).long())],
                          gradients=True)
    assert model.calls == 2
    _assert_same(before, model)


def test_gradients_backward_raising_midway_hands_everything_back(clean_global_state: None) -> None:
    """Labels the model's output has no class for, in the second batch: the loss raises."""
    model = _prepared(Classifier())
    before = _flags(model)
    x = torch.from_numpy(_x(64))
    with pytest.raises(ModelRunError, match=r"backward pass for --gradients \(loss cross-entropy\).*sample 32.*"
                                            r"Target 99 is out of bounds"):
        reluscope.analyze(model, [(x[:32], torch.zeros(32, dtype=torch.long)), (x[32:], torch.full((32,), 99))],
                          gradients=True)
    _assert_same(before, model)


@pytest.mark.parametrize("gradients", [False, True], ids=["forward", "gradients"])
def test_torchscript_raising_midway_hands_everything_back(gradients: bool, clean_global_state: None) -> None:
    """The second batch has 3 channels: TorchScript's frozen graph used to segfault on that."""
    scripted = torch.jit.script(_digits_cnn()).train()
    scripted.conv1.weight.requires_grad_(False)
    before = {"training": {n: m.training for n, m in scripted.named_modules()},
              "requires_grad": {n: p.requires_grad for n, p in scripted.named_parameters()}}
    x = torch.from_numpy(_x(16))
    with pytest.raises(ModelRunError, match=r"sample 16 \(input shape \(16, 3, 8, 8\); its first layer conv1 "
                                            r"\(Conv2d\) takes 1 input channels\)"):
        reluscope.analyze(scripted, [x, torch.zeros(16, 3, 8, 8)], gradients=gradients)
    assert {n: m.training for n, m in scripted.named_modules()} == before["training"]
    assert {n: p.requires_grad for n, p in scripted.named_parameters()} == before["requires_grad"]
    assert all(v == 0 for v in global_hook_state().values())


def test_exported_graph_raising_midway_hands_everything_back(clean_global_state: None) -> None:
    module = torch.export.load(str(SAMPLES / "digits_mlp.pt2")).module()
    hooks = module_hook_state(module)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    x = torch.from_numpy(_x(16))
    with pytest.raises(ModelRunError, match=r"sample 16 \(input shape \(16, 3, 8, 8\); the model expects "
                                            r"\(batch, 1, 8, 8\)\)"):
        reluscope.analyze(module, [x, torch.zeros(16, 3, 8, 8)], gradients=True)
    assert module_hook_state(module) == hooks
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert all(v == 0 for v in global_hook_state().values())


def test_arch_factory_calling_sys_exit_is_a_usage_error(workdir: Path) -> None:
    """sys.exit(1) inside user code would otherwise end reluscope with the gate-failed code."""
    (workdir / "exits.py").write_text("import sys\n\ndef build():\n    sys.exit(1)\n")
    outcome = run_cli(["analyze", "digits_mlp.pt", "--arch", "exits.py:build", "--data", "calib.npz"], workdir, {})
    assert "raised SystemExit: 1" in assert_one_line_error(outcome, workdir)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_memory_restarts_with_smaller_batches(clean_global_state: None) -> None:
    """A forward pass that asks the CUDA allocator for 40 TB at batch sizes above 16: a real
    torch.cuda.OutOfMemoryError from the allocator, without filling the GPU first."""
    class Greedy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 8)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 16:
                torch.empty(10**13, device=x.device)
            return self.act(self.fc(x.flatten(1)))

    torch.manual_seed(0)
    model = Greedy()
    x = torch.from_numpy(_x(100))
    report = reluscope.analyze(model, x, device="cuda", batch_size=64)
    assert report.run["batch_size"] == 16
    assert [w for w in report.warnings if "out of memory" in w] == [
        "CUDA ran out of memory at batch size 64; restarted with batch size 32",
        "CUDA ran out of memory at batch size 32; restarted with batch size 16"]
    assert report.data["samples"] == 100 and report.layers[0]["samples"] == 100  # nothing counted twice
    expected = reluscope.analyze(model, x, device="cpu", batch_size=16)
    assert report.layers[0]["dead_units"] == expected.layers[0]["dead_units"]
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_concurrent_export_loads_never_lift_the_weights_only_switch(tmp_path: Path) -> None:
    """Library users may load from several threads: the forced weights_only switch is process-wide,
    so overlapping loads must not restore each other's environment while a payload is read (and
    torch.export.load itself fails when two run at once)."""
    from concurrent.futures import ThreadPoolExecutor

    from reluscope.backends import load_model

    payload = tmp_path / "payload.pt2"
    pt2_with_pickled_weight(SAMPLES / "digits_mlp.pt2", payload, tmp_path / MARKER)
    paths = [payload if i % 2 else SAMPLES / "digits_mlp.pt2" for i in range(12)]

    def load(path: Path) -> str:
        try:
            load_model(path, trust_checkpoint=False)
        except UnsafeCheckpointError:
            return "refused"
        return "loaded"

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(load, paths))
    assert outcomes == ["refused" if path == payload else "loaded" for path in paths]
    assert not (tmp_path / MARKER).exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_trusted_export_loads_from_several_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from reluscope.backends import load_model

    with ThreadPoolExecutor(max_workers=4) as pool:
        loaded = list(pool.map(lambda _: load_model(SAMPLES / "digits_cnn.pt2", trust_checkpoint=True), range(8)))
    assert {item.format for item in loaded} == {"torch-export"}
