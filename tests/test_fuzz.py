"""Property-based tests and a bounded fuzz run (issue 7).

* The data loaders: any array, file or iterable either gives back exactly its samples, batch
  by batch, or is refused with a ReluscopeError; nothing else escapes.
* Report building: for any outputs (NaN/Inf included) the report counts what numpy counts and
  is valid JSON under the published schema.
* File formats: mutated copies of the sample model and data files (truncated, bit-flipped,
  bytes inserted, random bytes behind zip/pickle/ONNX/npy headers, a damaged zip member) go
  through the command line; each must end with exit 0 (a harmless mutation) or exit 2 with one
  `error:` line: never exit 3, never a traceback, never a leftover -o file.

Deterministic for CI: derandomized, no example database, no shrinking (a failure reports the
example that failed), and a bounded number of examples.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope import data as sources
from reluscope.cli import app
from reluscope.errors import InputError
from reluscope.measure.sites import SiteInfo
from reluscope.report import Thresholds, build_layer, build_summary

from conftest import ARCHITECTURES, CALIB, SAMPLES

def bounded(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------- data loaders
NUMERIC = st.one_of(hnp.floating_dtypes(sizes=(16, 32, 64)), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(sizes=8),
                    hnp.boolean_dtypes())
NOT_NUMBERS = st.one_of(hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(max_len=3),
                        hnp.byte_string_dtypes(max_len=3), hnp.datetime64_dtypes())


def expected_tensor(array: np.ndarray) -> torch.Tensor:
    """What the loaders hand the backend: every dtype as it is (float64 too: the backend casts to the
    model's dtype), native byte order, booleans as 0.0/1.0."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
    if tensor.dtype == torch.bool:
        tensor = tensor.float()
    return tensor


def collect(source: sources.DataSource, batch_size: int, max_samples: int | None) -> list[sources.Batch]:
    batches = list(source.batches(batch_size, max_samples))
    for batch in batches:
        assert 1 <= batch.size <= batch_size
        assert all(t.shape[0] == batch.size for t in batch.inputs)
    return batches


@bounded(150)
@given(dtype=st.one_of(NUMERIC, NOT_NUMBERS), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
       batch_size=st.integers(1, 4), max_samples=st.none() | st.integers(0, 7), data=st.data())
def test_arrays_are_batched_exactly_or_refused(dtype: np.dtype, shape: tuple[int, ...], batch_size: int,
                                               max_samples: int | None, data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(dtype, shape))
    numeric = dtype.kind in "biuf"
    if array.ndim == 0:
        with pytest.raises(InputError, match="scalar"):
            sources.from_object(array)
        return
    source = sources.from_object(array)
    assert source.samples == shape[0]
    wanted = shape[0] if max_samples is None else min(shape[0], max_samples)
    if not numeric and wanted > 0:
        with pytest.raises(InputError, match="give real numbers"):
            collect(source, batch_size, max_samples)
        return
    batches = collect(source, batch_size, max_samples)
    assert sum(b.size for b in batches) == wanted
    if batches:
        got = torch.cat([torch.as_tensor(b.inputs[0]) for b in batches])
        want = expected_tensor(array[:wanted])
        assert got.dtype == want.dtype and torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(got.isnan(), want.isnan())


@bounded(60)
@given(samples=st.integers(0, 6), sample_shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool"]),
       labels=st.sampled_from(["none", "matching", "short", "scalar"]),
       kind=st.sampled_from(["npy", "npz", "pt-tuple", "pt-dict", "pt-legacy"]),
       batch_size=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_files_give_back_their_samples_or_a_clean_error(tmp_path_factory: pytest.TempPathFactory, samples: int,
                                                        sample_shape: tuple[int, ...], dtype: str, labels: str,
                                                        kind: str, batch_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(samples, *sample_shape)) * 5).astype(dtype)
    y = {"none": None, "matching": rng.integers(0, 3, samples), "short": rng.integers(0, 3, samples + 1),
         "scalar": np.int64(1)}[labels]
    if kind == "npy":
        y = None
    folder = tmp_path_factory.mktemp("files")
    path = folder / f"data.{kind.split('-')[0]}"
    tx = torch.from_numpy(x)
    if kind == "npy":
        np.save(path, x)
    elif kind == "npz":
        np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    else:
        obj: Any = tx if y is None else {"x": tx, "y": torch.as_tensor(y)}
        if kind == "pt-tuple" and y is not None and labels == "matching":
            obj = (tx, torch.as_tensor(y))
        torch.save(obj, path, _use_new_zipfile_serialization=kind != "pt-legacy")
    bad_labels = y is not None and labels != "matching"
    try:
        source = sources.from_path(path)
    except InputError as exc:
        assert samples == 0 or bad_labels, exc
        return
    assert not bad_labels and samples > 0
    batches = collect(source, batch_size, None)
    got = torch.cat([torch.as_tensor(b.inputs[0]) for b in batches])
    assert torch.equal(got, expected_tensor(x))
    if y is not None:
        assert torch.equal(torch.cat([torch.as_tensor(b.labels) for b in batches]), torch.as_tensor(y))


@bounded(60)
@given(sizes=st.lists(st.integers(1, 5), min_size=0, max_size=6), with_labels=st.booleans(),
       as_dict=st.booleans(), max_samples=st.none() | st.integers(0, 20))
def test_iterables_of_batches_stream_in_order(sizes: list[int], with_labels: bool, as_dict: bool,
                                              max_samples: int | None) -> None:
    total = sum(sizes)
    x = torch.arange(total * 3, dtype=torch.float32).reshape(total, 3)
    y = torch.arange(total) % 4
    bounds = np.cumsum([0, *sizes])
    items: list[Any] = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if as_dict:
            items.append({"x": x[start:stop], **({"y": y[start:stop]} if with_labels else {})})
        else:
            items.append((x[start:stop], y[start:stop]) if with_labels else x[start:stop])
    source = sources.from_object(items)
    batches = collect(source, 1_000, max_samples)
    wanted = total if max_samples is None else min(total, max_samples)
    assert sum(b.size for b in batches) == wanted
    if wanted:
        assert torch.equal(torch.cat([torch.as_tensor(b.inputs[0]) for b in batches]), x[:wanted])
        if with_labels:
            assert torch.equal(torch.cat([torch.as_tensor(b.labels) for b in batches]), y[:wanted])


# ---------------------------------------------------------------------------------------------- report building
SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0])


@bounded(80)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4),
                    elements=st.one_of(st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32), SPECIAL)),
       batch_size=st.integers(1, 5), leaky=st.booleans())
def test_reports_count_what_numpy_counts(x: np.ndarray, batch_size: int, leaky: bool) -> None:
    from jsonschema import validate

    from reluscope.schema import report_schema

    model = nn.Sequential(nn.LeakyReLU(0.1) if leaky else nn.ReLU())
    report = reluscope.analyze(model, torch.from_numpy(x.copy()), batch_size=batch_size)
    payload = json.loads(report.to_json())  # allow_nan=False: no NaN/Inf in the report itself
    validate(payload, report_schema())
    layer = payload["layers"][0]
    y = np.where(x > 0, x, 0.1 * x if leaky else 0.0).astype(np.float32)
    y[np.isnan(x)] = np.nan
    finite = np.isfinite(y)
    assert layer["nonfinite"] == int((~finite).sum()) == payload["summary"]["nonfinite"]
    assert layer["samples"] == x.shape[0] and payload["data"]["samples"] == x.shape[0]
    unit_axis = 1 if x.ndim >= 4 else x.ndim - 1  # channels for image-like ranks, else the last axis
    active = np.moveaxis(x > 0, unit_axis, 0).reshape(x.shape[unit_axis], -1)  # +Inf is active, NaN not
    assert layer["units"] == x.shape[unit_axis]
    assert layer["zero_fraction"] == pytest.approx(1 - active.mean())
    assert layer["dead_units"] == np.flatnonzero(~active.any(axis=1)).tolist()
    if finite.any():
        assert layer["min"] == pytest.approx(float(y[finite].min()))
        assert layer["max"] == pytest.approx(float(y[finite].max()))
        assert layer["mean"] == pytest.approx(float(y[finite].astype(np.float64).mean()), rel=1e-5, abs=1e-6)
    else:
        assert layer["min"] is None and layer["max"] is None


@st.composite
def host_stats(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """Accumulators as SiteStats.to_host returns them, consistent with each other."""
    units = draw(st.integers(1, 6))
    per_unit = draw(st.integers(0, 50))
    elements = units * per_unit
    nonfinite = draw(st.integers(0, elements))
    active = [draw(st.integers(0, per_unit)) for _ in range(units)]
    low = draw(st.floats(-1e6, 1e6))
    high = draw(st.floats(low, 1e6))
    finite = elements - nonfinite
    return {
        "elements": elements, "samples": per_unit, "active": active,
        "abs_sum": draw(st.none() | st.lists(st.floats(0, 1e6), min_size=units, max_size=units)),
        "saturated": draw(st.integers(0, elements)), "nonfinite": nonfinite,
        "min": low if finite else math.inf, "max": high if finite else -math.inf,
        "sum": draw(st.floats(-1e9, 1e9)) if finite else 0.0, "sumsq": draw(st.floats(0, 1e12)) if finite else 0.0,
        "percentiles": None,
    }, units


@bounded(150)
@given(sites=st.lists(host_stats(), min_size=0, max_size=4), rare=st.floats(0, 1), tau=st.floats(0, 1),
       upper=st.none() | st.just(6.0))
def test_layers_and_summary_are_valid_json(sites: list[tuple[dict[str, Any], int]], rare: float, tau: float,
                                           upper: float | None) -> None:
    layers = [build_layer(SiteInfo(f"site{i}", "relu", (units,), 0), host, Thresholds(rare, tau), hard_zero=True,
                          upper=upper) for i, (host, units) in enumerate(sites)]
    summary = build_summary(layers)
    json.dumps({"layers": layers, "summary": summary}, allow_nan=False)
    for layer, (host, units) in zip(layers, sites):
        assert layer["units"] == units
        assert set(layer["dead_units"]).isdisjoint(layer["rarely_active_units"])
        assert all(0 <= u < units for u in layer["dead_units"] + layer["rarely_active_units"] + layer["dormant_units"])
        for key in ("zero_fraction", "dead_fraction", "rarely_active_fraction"):
            assert 0.0 <= layer[key] <= 1.0, key
        assert layer["std"] >= 0
    assert summary["units"] == sum(units for _, units in sites)
    assert summary["dead_units"] == sum(len(layer["dead_units"]) for layer in layers)
    assert 0.0 <= summary["dead_fraction"] <= 1.0


# ---------------------------------------------------------------------------------------------- file fuzzing
runner = CliRunner()
MODEL_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".pt", ".pt2", ".torchscript", ".onnx"))
HEADERS = [b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", b"\x80\x04\x95", b"\x93NUMPY\x01\x00", b"",
           (SAMPLES / "digits_mlp.onnx").read_bytes()[:24]]  # a real ONNX file's first field tags


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "random", "zip-member"]))
    data = bytearray(original)
    position = st.integers(0, len(data) - 1)
    if kind == "truncate":
        data = data[:draw(position)]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            index = draw(position)
            data[index] ^= 1 << draw(st.integers(0, 7))
    elif kind == "insert":
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(data)))
            data[index:index] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "random":
        data = bytearray(draw(st.sampled_from(HEADERS)) + draw(st.binary(max_size=2048)))
    elif original[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(original)) as archive:
            victim = draw(st.sampled_from(archive.namelist()))
            kind += f":{victim}"
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as rewritten:  # valid CRCs: the damage is in the member's content
                for info in archive.infolist():
                    member = bytearray(archive.read(info.filename))
                    if info.filename == victim and member:
                        for _ in range(draw(st.integers(1, 8))):
                            index = draw(st.integers(0, len(member) - 1))
                            member[index] ^= 1 << draw(st.integers(0, 7))
                    rewritten.writestr(info, bytes(member))
        data = bytearray(out.getvalue())
    return kind, bytes(data)


def assert_clean_outcome(result: Any, report: Path, fd_err: str, what: str) -> None:
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (what, repr(result.exception))
    assert result.exit_code in (0, 2), (what, result.exit_code, output[-2000:])
    assert "Traceback" not in output + fd_err, (what, output[-2000:], fd_err[-2000:])
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
        assert result.stdout == ""
        assert not report.exists(), what
    assert not [p for p in report.parent.iterdir() if p.name.startswith(f".{report.name}.")], what  # temp files


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@bounded(200)
@given(data=st.data(), name=st.sampled_from(MODEL_FILES))
def test_mutated_model_files_fail_cleanly(data: st.DataObject, name: str, fuzz_dir: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    kind, content = data.draw(mutated((SAMPLES / name).read_bytes()), label="mutation")
    path = fuzz_dir / f"model{Path(name).suffix}"
    path.write_bytes(content)
    report = fuzz_dir / "report.json"
    report.unlink(missing_ok=True)
    factory = "digits_cnn" if "cnn" in name else "digits_mlp"
    # TorchScript is code and needs --trust-checkpoint; mutations of the sample's own harmless code are fuzzed
    trust = ["--trust-checkpoint"] if name.endswith(".torchscript") else []
    result = runner.invoke(app, ["analyze", str(path), "--arch", f"{ARCHITECTURES}:{factory}", "--data", str(CALIB),
                                 "-n", "32", "-b", "32", "-f", "json", "-o", str(report), "-q", *trust],
                           env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert_clean_outcome(result, report, capfd.readouterr().err, f"{name} {kind}")
    if result.exit_code == 0:
        assert json.loads(report.read_text())["data"]["samples"] == 32


def _data_files() -> dict[str, bytes]:
    with np.load(CALIB) as archive:
        x, y = archive["x"][:40], archive["y"][:40]
    files = {}
    buffer = io.BytesIO()
    np.save(buffer, x)
    files["npy"] = buffer.getvalue()
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    files["npz"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), buffer)
    files["pt"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"x": torch.from_numpy(x)}, buffer, _use_new_zipfile_serialization=False)
    files["pt-legacy"] = buffer.getvalue()
    return files


DATA_FILES = _data_files()


@bounded(150)
@given(data=st.data(), kind=st.sampled_from(sorted(DATA_FILES)), onnx=st.booleans(), gradients=st.booleans())
def test_mutated_data_files_fail_cleanly(data: st.DataObject, kind: str, onnx: bool, gradients: bool,
                                         fuzz_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    mutation, content = data.draw(mutated(DATA_FILES[kind]), label="mutation")
    path = fuzz_dir / f"data.{kind.split('-')[0]}"
    path.write_bytes(content)
    report = fuzz_dir / "report.json"
    report.unlink(missing_ok=True)
    model = [str(SAMPLES / "digits_mlp.onnx")] if onnx else [str(SAMPLES / "digits_mlp.pt"), "--arch",
                                                              f"{ARCHITECTURES}:digits_mlp"]
    if gradients and not onnx:
        model.append("--gradients")
    result = runner.invoke(app, ["analyze", *model, "--data", str(path), "-f", "json", "-o", str(report), "-q"],
                           env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert_clean_outcome(result, report, capfd.readouterr().err, f"{kind} {mutation}")


def test_the_fuzz_corpus_really_is_pickle_free() -> None:
    """The mutations start from files that load without --trust-checkpoint (TorchScript, which is
    code, with it), so any refusal of unpickling in the fuzz run comes from damage, not from the
    originals."""
    for name in MODEL_FILES:
        factory = "digits_cnn" if "cnn" in name else "digits_mlp"
        arch = f"{ARCHITECTURES}:{factory}" if name.endswith(".pt") else None
        trust = name.endswith(".torchscript")
        assert reluscope.analyze(SAMPLES / name, CALIB, arch=arch, max_samples=8,
                                 trust_checkpoint=trust).data["samples"] == 8
    for kind, content in DATA_FILES.items():
        if kind.startswith("pt"):
            torch.load(io.BytesIO(content), weights_only=True)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None
