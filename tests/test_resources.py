"""Resources (security): sizes are checked against what is read before anything is allocated.

A Fortran-order `.npz` member that would be read whole, an ONNX file whose external data claims
gigabytes, image folders resized to billions of pixels: each is refused cheaply, exit 2, one line.
Float data reaches the model in the model's own dtype (a float64 model sees 1e300 as it is), with a
warning when a cast loses range. The names reluscope adds to an ONNX graph never collide with the
model's own.

The `RESOURCE_CASES` below are rows of docs/errors.md: test_hostile.py runs them with the others.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import reluscope
from reluscope.errors import InputError, UsageError

from conftest import CALIB, SAMPLES

GIB = 2**30


# ---------------------------------------------------------------------------------------------- builders
def fortran_npz(path: Path, shape: tuple[int, ...], *, compress: bool = True) -> None:
    """An .npz whose `x` is a float32 array of `shape` stored in Fortran order, all zeros: it deflates to
    a small fraction of its size. Written a block at a time (the test never holds it in memory)."""
    from numpy.lib import format as npy_format

    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=1 if compress else None) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            npy_format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": True, "shape": shape})
            left = int(np.prod(shape)) * 4
            block = bytes(1 << 22)
            while left:
                member.write(block[:min(left, len(block))])
                left -= min(left, len(block))


def external_onnx(folder: Path, name: str, *, dims: tuple[int, ...] = (64, 2), length: int | None,
                  data_bytes: int, sparse: bool = False, offset: int | None = None) -> Path:
    """A tiny ONNX model (MatMul by an external weight `w`, then Relu) whose `w` lives in `w.bin`, with
    the external-data `length` and data file size given (a sparse file costs no disk)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", dims[1]])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64])
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("length", length), ("offset", offset)):
        if value is not None:
            entry = w.external_data.add()
            entry.key, entry.value = key, str(value)
    graph = helper.make_graph([helper.make_node("Reshape", ["input", "shape"], ["flat"]),
                               helper.make_node("MatMul", ["flat", "w"], ["h"]),
                               helper.make_node("Relu", ["h"], ["out"])], "g", [x], [y], [shape, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = folder / name
    onnx.save(model, path)
    with open(folder / "w.bin", "wb") as handle:
        if sparse:
            handle.truncate(data_bytes)
        else:
            handle.write(np.random.default_rng(0).normal(size=data_bytes // 4).astype(np.float32).tobytes())
    return path


def _write_fortran_case(work: Path) -> None:
    fortran_npz(work / "fortran.npz", (300_000, 1, 16, 16))


def _write_external_length(work: Path) -> None:
    external_onnx(work, "bomb.onnx", length=6 * GIB, data_bytes=512)


def _write_external_sparse(work: Path) -> None:
    external_onnx(work, "sparse.onnx", length=None, data_bytes=6 * GIB, sparse=True)


def _write_images(work: Path) -> None:
    from PIL import Image

    (work / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(work / "images" / "a.png")


def _write_float64_beyond_float32(work: Path) -> None:
    with np.load(CALIB) as archive:
        x = archive["x"][:10].astype(np.float64)
    x[0, 0, 0, 0] = 1e300
    np.savez(work / "huge64.npz", x=x)


# case -> (setup, run in a real process)
RESOURCE_CASES: dict[str, tuple[Callable[[Path], None], bool]] = {
    "npz-fortran": (_write_fortran_case, False),
    "onnx-external-length": (_write_external_length, False),
    "onnx-external-sparse": (_write_external_sparse, False),
    "image-shape-too-large": (_write_images, False),
    "float64-beyond-float32": (_write_float64_beyond_float32, False),
}


def _peak_rss_mb(code: str) -> tuple[int, str, float]:
    """Run `code` in a fresh interpreter; (exit code, stderr, its peak resident memory in MB). VmHWM
    belongs to the process's own memory (getrusage's ru_maxrss would carry pytest's over exec)."""
    script = code + ("\nimport sys\nprint(next(l.split()[1] for l in open('/proc/self/status') "
                     "if l.startswith('VmHWM:')), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    peak = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else float("nan")
    return done.returncode, done.stderr, peak


# ---------------------------------------------------------------------------------------------- .npz
def test_a_fortran_member_beyond_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    """6 MB on disk that inflate to GB: refused from the header, in well under a second, without memory."""
    fortran_npz(tmp_path / "f.npz", (2_000_000, 1, 8, 8))  # 512 MB of zeros
    assert (tmp_path / "f.npz").stat().st_size < 5_000_000
    started = time.monotonic()
    with pytest.raises(InputError, match=r"Fortran \(column-major\) order.*512\.0 MB.*np\.ascontiguousarray"):
        reluscope.analyze(nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU()), tmp_path / "f.npz",
                          max_samples=64)
    assert time.monotonic() - started < 5


def test_a_fortran_member_within_the_limit_is_read_as_numpy_reads_it(tmp_path: Path) -> None:
    with np.load(CALIB) as archive:
        x = archive["x"]
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x))
    np.savez(tmp_path / "c.npz", x=x)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    fortran = reluscope.analyze(model, tmp_path / "f.npz").to_dict()
    c_order = reluscope.analyze(model, tmp_path / "c.npz").to_dict()
    assert fortran["layers"] == c_order["layers"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_the_fortran_limit_applies_to_the_cli_in_a_real_process(tmp_path: Path) -> None:
    """The reported case: the whole member was inflated (6 GB) for --max-samples 64. Now the process
    stays at its usual size."""
    fortran_npz(tmp_path / "f.npz", (1_000_000, 1, 16, 16))  # 1 GB of zeros, ~1 MB on disk
    code = ("import sys\nfrom reluscope.cli import main\ntry:\n"
            f"    main(['analyze', {str(SAMPLES / 'digits_mlp.onnx')!r}, '--data', {str(tmp_path / 'f.npz')!r}, "
            "'--max-samples', '64', '-q'])\nexcept SystemExit as e:\n    print('EXIT', e.code, file=sys.stderr)\n")
    _, stderr, peak = _peak_rss_mb(code)
    assert "EXIT 2" in stderr and "Fortran (column-major) order" in stderr, stderr
    assert peak < 800, f"peak memory {peak:.0f} MB"


# ---------------------------------------------------------------------------------------------- ONNX external data
def test_external_data_within_its_file_loads(tmp_path: Path) -> None:
    path = external_onnx(tmp_path, "ok.onnx", length=64 * 2 * 4, data_bytes=64 * 2 * 4)
    report = reluscope.analyze(path, CALIB, max_samples=20).to_dict()
    assert [layer["op"] for layer in report["layers"]] == ["relu"]


@pytest.mark.parametrize("kwargs, message", [
    ({"length": 6 * GIB, "data_bytes": 512},
     r"claims 6442450944 bytes at 0\.\.6442450944 of w\.bin, which holds 512 bytes"),
    ({"length": None, "data_bytes": 6 * GIB, "sparse": True},
     r"needs 512 bytes, its external data claims 6442450944 \(at 0 of w\.bin\)"),
    ({"length": 1024, "data_bytes": 4096}, r"needs 512 bytes, its external data claims 1024"),
    ({"length": 512, "data_bytes": 512, "offset": 4096}, r"claims 512 bytes at 4096\.\.4608 of w\.bin, which holds 512"),
])
def test_external_data_claims_are_checked_before_reading(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    path = external_onnx(tmp_path, "m.onnx", **kwargs)
    started = time.monotonic()
    with pytest.raises(InputError, match=message):
        reluscope.analyze(path, CALIB)
    assert time.monotonic() - started < 5


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    path = external_onnx(tmp_path, "m.onnx", length=512, data_bytes=512)
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[1].external_data:
        if entry.key == "location":
            entry.value = "../w.bin"
    onnx.save(model, path)
    with pytest.raises(InputError, match=r"keeps its data at '\.\./w\.bin', not in a file beside the model"):
        reluscope.analyze(path, CALIB)


def test_tensors_may_not_claim_more_than_their_files_hold_together(tmp_path: Path) -> None:
    """Each of many tensors fits the file alone; together they would read it many times over."""
    path = external_onnx(tmp_path, "m.onnx", length=512, data_bytes=512)
    model = onnx.load(path, load_external_data=False)
    w = model.graph.initializer[1]
    for index in range(50):
        copy = model.graph.initializer.add()
        copy.CopyFrom(w)
        copy.name = f"w{index}"
    onnx.save(model, path)
    with pytest.raises(InputError, match=r"its tensors claim 26112 bytes of external data, their files hold 512"):
        reluscope.analyze(path, CALIB)


# ---------------------------------------------------------------------------------------------- image folders
def test_an_image_size_beyond_pillows_bound_is_refused_before_decoding(tmp_path: Path) -> None:
    _write_images(tmp_path)
    started = time.monotonic()
    with pytest.raises(UsageError, match=r"resizes every image to 10,000,000,000 pixels"):
        reluscope.analyze(SAMPLES / "digits_mlp.onnx", tmp_path / "images", input_shape=(1, 100_000, 100_000))
    assert time.monotonic() - started < 5


def test_an_image_batch_beyond_the_memory_available_is_refused(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from reluscope import data

    _write_images(tmp_path)
    monkeypatch.setattr(data, "_available_memory", lambda: 100)
    with pytest.raises(InputError, match=r"^a batch of 1 images of 1,8,8 needs 256 bytes as float32, more than the "
                                         r"100 bytes of memory available; pass a smaller --batch-size or --input-shape$"):
        reluscope.analyze(SAMPLES / "digits_mlp.onnx", tmp_path / "images", input_shape=(1, 8, 8))


# ---------------------------------------------------------------------------------------------- dtypes
def _huge64() -> np.ndarray:
    with np.load(CALIB) as archive:
        x = archive["x"][:10].astype(np.float64)
    x[0, 0, 0, 0] = 1e300
    return x


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8, dtype=torch.float64)
        with torch.no_grad():  # 1e-300: float64 only
            self.fc.weight.fill_(1e-300)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.flatten(1)))


def test_float64_data_reaches_a_float64_model_as_it_is() -> None:
    """1e300 times 1e-300 is 1 in float64; cast to float32 first (as before) it was inf."""
    report = reluscope.analyze(_Scale(), _huge64())
    (layer,) = report.to_dict()["layers"]
    assert layer["nonfinite"] == 0 and 0.5 < layer["max"] < 2
    assert not [w for w in report.warnings if "cast" in w], report.warnings


def test_a_cast_that_loses_range_warns_once() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
    report = reluscope.analyze(model, _huge64(), batch_size=2)
    range_warnings = [w for w in report.warnings if "beyond the range of float32" in w]
    assert len(range_warnings) == 1, report.warnings
    assert "largest magnitude 1e+300" in range_warnings[0]
    # float64 data within float32's range: cast silently (numpy's default dtype, the model's default one)
    quiet = reluscope.analyze(model, _huge64().clip(-10, 10))
    assert not [w for w in quiet.warnings if "float" in w], quiet.warnings


def test_onnx_inputs_warn_when_a_cast_loses_range() -> None:
    report = reluscope.analyze(SAMPLES / "digits_mlp.onnx", _huge64())
    assert any("ONNX input 'input' takes float32; the data (float64) holds values beyond its range "
               "(largest magnitude 1e+300)" in w for w in report.warnings), report.warnings
    quiet = reluscope.analyze(SAMPLES / "digits_mlp.onnx", _huge64().clip(-10, 10))
    assert not [w for w in quiet.warnings if "float" in w], quiet.warnings


# ---------------------------------------------------------------------------------------------- ONNX names
def _renamed(source: Path, target: Path) -> None:
    """`source` with every tensor and node named `reluscope::N`: the names reluscope used to add."""
    model = onnx.load(source)
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if name and name not in names:
            names[name] = f"reluscope::{len(names) + 1}"
        return names.get(name, name)

    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        value.name = rename(value.name)
    for node in graph.node:
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        node.name = rename(node.name)
    onnx.checker.check_model(model)
    onnx.save(model, target)


def test_onnx_names_like_reluscopes_own_do_not_collide(tmp_path: Path) -> None:
    """A valid model whose tensors are named `reluscope::N` (a CNN: its sites are reduced in the graph)."""
    _renamed(SAMPLES / "digits_cnn.onnx", tmp_path / "named.onnx")
    renamed = reluscope.analyze(tmp_path / "named.onnx", CALIB).to_dict()
    original = reluscope.analyze(SAMPLES / "digits_cnn.onnx", CALIB).to_dict()
    assert [l["dead_units"] for l in renamed["layers"]] == [l["dead_units"] for l in original["layers"]]
    assert [l["max"] for l in renamed["layers"]] == [l["max"] for l in original["layers"]]


def test_free_prefix_avoids_every_name_of_the_graph() -> None:
    from reluscope.backends.onnx.graph import free_prefix

    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    assert free_prefix(model.graph, "reluscope::") == "reluscope::"
    model.graph.node[0].name = "reluscope::x"
    model.graph.node[1].output[0] = "reluscope2::7"
    assert free_prefix(model.graph, "reluscope::") == "reluscope3::"
