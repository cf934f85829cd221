"""Calibration data sources: files on disk, image folders, synthetic inputs, empty and broken data."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import reluscope
from reluscope import data as sources
from reluscope.errors import InputError, ReluscopeError, UsageError


def _collect(source: sources.DataSource, batch_size: int = 4, max_samples: int | None = None):
    """Batches and their inputs and labels concatenated, as tensors (sources hand numpy data over as
    numpy arrays, which the torch backend wraps; tensors given as data stay tensors)."""
    batches = list(source.batches(batch_size, max_samples))
    xs = torch.cat([torch.as_tensor(b.inputs[0]) for b in batches]) if batches else torch.empty(0)
    ys = torch.cat([torch.as_tensor(b.labels) for b in batches]) if batches and batches[0].labels is not None \
        else None
    return batches, xs, ys


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(10, 2, 3)).astype(np.float32), rng.integers(0, 5, size=10)


# ----------------------------------------------------------------------------- files
def test_npy(arrays, tmp_path: Path) -> None:
    x, _ = arrays
    np.save(tmp_path / "x.npy", x.astype(np.float64))  # float64 on disk stays float64: the backend casts it to the model's dtype
    source = sources.from_path(tmp_path / "x.npy")
    batches, xs, ys = _collect(source, 4)
    assert source.samples == 10 and not source.synthetic
    assert [b.size for b in batches] == [4, 4, 2]
    assert xs.dtype == torch.float64 and ys is None
    np.testing.assert_array_equal(xs.numpy(), x)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
@pytest.mark.parametrize(("xkey", "ykey"), [("x", "y"), ("inputs", "labels")])
def test_npz(xkey: str, ykey: str, save, arrays, tmp_path: Path) -> None:
    x, y = arrays
    save(tmp_path / "d.npz", **{xkey: x, ykey: y})
    source = sources.from_path(tmp_path / "d.npz")
    for _ in range(2):  # a second pass (a run that starts over) reads the same rows again
        batches, xs, ys = _collect(source, 3)
        assert [b.size for b in batches] == [3, 3, 3, 1]
        np.testing.assert_array_equal(xs.numpy(), x)
        np.testing.assert_array_equal(ys.numpy(), y)
    shard = list(source.batches(3, owns=lambda index: index % 2 == 1))  # a torchrun rank's batches
    np.testing.assert_array_equal(np.concatenate([b.inputs[0] for b in shard]), np.concatenate([x[3:6], x[9:]]))


def test_npz_fortran_order_and_big_endian(arrays, tmp_path: Path) -> None:
    x, y = arrays
    np.savez(tmp_path / "d.npz", x=np.asfortranarray(x), y=y.astype(">i8"))
    _, xs, ys = _collect(sources.from_path(tmp_path / "d.npz"), 4)
    np.testing.assert_array_equal(xs.numpy(), x)
    np.testing.assert_array_equal(ys.numpy(), y)


def test_npz_damaged_inside_the_data_is_one_clear_error(tmp_path: Path) -> None:
    """The rows are read during the analysis: damage found there is still one line, exit 2."""
    x = np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32)
    np.savez_compressed(tmp_path / "d.npz", x=x)
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(64)  # corrupt the deflate stream well past the header
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    source = sources.from_path(tmp_path / "bad.npz")  # the header still reads
    with pytest.raises(InputError, match=r"cannot read calibration data .*bad\.npz \(array 'x'\): .*damaged"):
        _collect(source, 50)


def test_a_compressed_npz_is_read_a_batch_at_a_time(tmp_path: Path, samples_dir: Path) -> None:
    """200 MB of samples that compress to a few hundred KB: analysing 64 of them must not inflate
    the rest into memory (np.load would, on first access)."""
    np.savez_compressed(tmp_path / "big.npz", x=np.zeros((800_000, 64), np.float32))
    np.savez_compressed(tmp_path / "small.npz", x=np.zeros((64, 64), np.float32))
    assert (tmp_path / "big.npz").stat().st_size < 2_000_000
    script = textwrap.dedent("""
        import resource, sys
        import reluscope
        report = reluscope.analyze(sys.argv[1], sys.argv[2], arch=sys.argv[3], max_samples=64)
        assert report.data["samples"] == 64
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    """)
    peak = {}
    for name in ("small", "big"):
        out = subprocess.run([sys.executable, "-c", script, str(samples_dir / "digits_mlp.pt"),
                              str(tmp_path / f"{name}.npz"), f"{samples_dir / 'architectures.py'}:digits_mlp"],
                             capture_output=True, text=True, check=True, timeout=300)
        peak[name] = int(out.stdout.split()[-1]) * 1024
    assert peak["big"] - peak["small"] < 50 * 2**20, peak  # the whole array would add 205 MB


def test_npz_labels_of_the_wrong_length(arrays, tmp_path: Path) -> None:
    x, y = arrays
    np.savez(tmp_path / "d.npz", x=x, y=y[:7])
    with pytest.raises(InputError, match="labels"):
        sources.from_path(tmp_path / "d.npz")


def test_npz_with_labels_only(arrays, tmp_path: Path) -> None:
    _, y = arrays
    np.savez(tmp_path / "d.npz", y=y)
    with pytest.raises(InputError):
        sources.from_path(tmp_path / "d.npz")


def test_pt_tensor_tuple_and_dict(arrays, tmp_path: Path) -> None:
    x, y = arrays
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    torch.save(tx, tmp_path / "t.pt")
    torch.save((tx, ty), tmp_path / "tuple.pt")
    torch.save({"x": tx, "y": ty}, tmp_path / "dict.pt")
    torch.save({"inputs": tx}, tmp_path / "inputs.pt")
    for name, has_labels in (("t.pt", False), ("tuple.pt", True), ("dict.pt", True), ("inputs.pt", False)):
        _, xs, ys = _collect(sources.from_path(tmp_path / name), 4)
        assert torch.equal(xs, tx), name
        if has_labels:
            assert torch.equal(ys, ty), name
        else:
            assert ys is None, name


def test_pt_labels_mismatch(arrays, tmp_path: Path) -> None:
    x, y = arrays
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y[:3])}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="labels"):
        sources.from_path(tmp_path / "bad.pt")


def test_pt_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(3, 2), "meta": nn.Linear(2, 2)}, tmp_path / "obj.pt")
    with pytest.raises(InputError):
        sources.from_path(tmp_path / "obj.pt")


def test_files_end_to_end(arrays, tmp_path: Path) -> None:
    """The same numbers whichever file the data came in (a ReLU on the raw input: stats are the data's)."""
    x, y = arrays
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), tmp_path / "d.pt")
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    relu = np.maximum(x.reshape(10, -1).astype(np.float64), 0)
    for name in ("x.npy", "d.npz", "d.pt"):
        layer = reluscope.analyze(model, tmp_path / name, batch_size=3).layer("1")
        assert layer["zero_fraction"] == pytest.approx((relu <= 0).mean(), abs=1e-12), name
        assert layer["max"] == pytest.approx(relu.max()), name
        assert layer["mean"] == pytest.approx(relu.mean(), rel=1e-6), name


def test_npy_with_a_model_that_writes_to_its_input(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))
    code = textwrap.dedent(f"""
        import torch, reluscope
        from torch import nn

        class InPlace(nn.Module):
            def forward(self, x):
                return x.relu_()

        report = reluscope.analyze(InPlace(), {str(tmp_path / 'x.npy')!r})
        print(report.layers[0]["units"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert proc.stdout.strip() == "4"


# ----------------------------------------------------------------------------- images
def _write_images(folder: Path, count: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = []
    for i in range(count):
        channels = 3 if mode == "RGB" else 1
        array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(array if mode == "RGB" else array[..., 0], mode=mode)
        image.save(folder / f"img_{i:02d}.png")
        pixels.append(array)
    return pixels


def test_image_folder_is_resized_to_input_shape(tmp_path: Path) -> None:
    from PIL import Image

    _write_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    source = sources.from_path(tmp_path / "imgs", input_shape=(3, 8, 6))
    batches, xs, _ = _collect(source, 2)
    assert source.samples == 5
    assert [b.size for b in batches] == [2, 2, 1]
    assert xs.shape == (5, 3, 8, 6) and xs.dtype == torch.float32
    with Image.open(tmp_path / "imgs" / "img_03.png") as image:
        expected = np.asarray(image.convert("RGB").resize((6, 8)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(xs[3].numpy(), expected, atol=1e-7)
    assert 0.0 <= xs.min() and xs.max() <= 1.0


def test_image_folder_in_grayscale_without_resizing(tmp_path: Path) -> None:
    pixels = _write_images(tmp_path / "imgs", 3, size=(7, 5), mode="L")
    _, xs, _ = _collect(sources.from_path(tmp_path / "imgs", input_shape=(1, 5, 7)), 8)
    assert xs.shape == (3, 1, 5, 7)
    np.testing.assert_allclose(xs[:, 0].numpy(), np.stack([p[..., 0] for p in pixels]) / 255.0, atol=1e-7)


def test_image_folder_needs_an_input_shape(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 2)
    with pytest.raises(UsageError, match="--input-shape"):
        sources.from_path(tmp_path / "imgs")


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        sources.from_path(tmp_path / "docs", input_shape=(3, 8, 8))


def test_undecodable_image(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = sources.from_path(tmp_path / "imgs", input_shape=(3, 4, 4))
    with pytest.raises(InputError, match="broken.png"):
        _collect(source, 8)


def test_image_folder_end_to_end(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    report = reluscope.analyze(model, tmp_path / "imgs", input_shape=(3, 16, 16), batch_size=3)
    assert report.data["samples"] == 4
    assert report.layer("1")["shape"] == [4, 14, 14]


@pytest.mark.parametrize(("normalize", "mean", "std"), [
    ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("0.5,0.25", (0.5,) * 3, (0.25,) * 3),
    ("0.1,0.2,0.3,0.4,0.5,0.6", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
    (((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),  # the API's (mean, std) pair
])
def test_image_folder_normalize(tmp_path: Path, normalize, mean, std) -> None:
    _write_images(tmp_path / "imgs", 3)
    _, plain, _ = _collect(sources.from_path(tmp_path / "imgs", input_shape=(3, 10, 12)), 8)
    source = sources.from_path(tmp_path / "imgs", input_shape=(3, 10, 12), normalize=normalize)
    _, xs, _ = _collect(source, 2)
    expected = (plain - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(xs, expected, atol=1e-6, rtol=1e-6)
    assert source.normalize is not None and source.normalize.to_dict()["mean"] == list(mean)


def test_image_folder_normalize_in_the_report_and_its_refusals(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    plain = reluscope.analyze(model, tmp_path / "imgs", input_shape=(3, 16, 16))
    assert plain.data["normalize"] == {"method": "none"}
    report = reluscope.analyze(model, tmp_path / "imgs", input_shape=(3, 16, 16), normalize="imagenet")
    assert report.data["normalize"] == {"method": "imagenet", "mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225]}
    assert report.layers != plain.layers
    # not images: fed as stored, with a warning, and no normalize in the data block
    x = torch.rand(6, 3, 16, 16)
    arrays = reluscope.analyze(model, x, normalize="imagenet")
    assert "normalize" not in arrays.data
    assert any("--normalize imagenet applies to folders of images only" in w for w in arrays.warnings)
    assert arrays.layers == reluscope.analyze(model, x).layers
    for bad, match in [("imagenet", "per RGB channel"), ("0.1,0.2,0.3,0.4", "2 means and stds")]:
        with pytest.raises(UsageError, match=match):
            sources.from_path(tmp_path / "imgs", input_shape=(1, 16, 16), normalize=bad)
    for bad in ("imagenet1k", "0.5", "0.5,0", "0.5,-1", "nan,1", "a,b"):
        with pytest.raises(UsageError, match="--normalize"):
            reluscope.analyze(model, tmp_path / "imgs", input_shape=(3, 16, 16), normalize=bad)


def _conv_bn(inputs: torch.Tensor) -> nn.Module:
    """A first conv + BatchNorm whose running statistics come from `inputs` (train-mode forwards).
    Half the filters see brightness (a mean component, as trained first layers have), half are
    zero-sum (edge detectors, which cannot tell)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU())
    model.train()
    with torch.no_grad():
        weight = torch.randn(8, 3, 3, 3) * 0.1
        weight[:4] += 0.1
        weight[4:] -= weight[4:].mean(dim=(1, 2, 3), keepdim=True)
        model[0].weight.copy_(weight)
        for chunk in inputs.split(16):
            model(chunk)
    return model.eval()


def test_warns_when_pixels_meet_a_model_trained_on_standardised_inputs(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 40)
    pixels = _collect(sources.from_path(tmp_path / "imgs", input_shape=(3, 16, 16)), 40)[1]
    # trained on inputs standardised with the training set's own per-channel mean and std
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
    standardised = (pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    on_standardised, on_pixels = _conv_bn(standardised), _conv_bn(pixels)
    warning = "looks trained on standardised inputs"
    report = reluscope.analyze(on_standardised, tmp_path / "imgs", input_shape=(3, 16, 16))
    assert sum(warning in w and "(0)" in w for w in report.warnings) == 1, report.warnings
    as_trained = ",".join(f"{v:.6f}" for v in [*mean.tolist(), *std.tolist()])
    for model, normalize in [(on_standardised, as_trained), (on_pixels, "none")]:
        report = reluscope.analyze(model, tmp_path / "imgs", input_shape=(3, 16, 16), normalize=normalize)
        assert not any(warning in w for w in report.warnings), (normalize, report.warnings)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic() -> None:
    a = _collect(sources.synthetic((2, 3)), 16)[1]
    b = _collect(sources.synthetic((2, 3)), 16)[1]
    assert a.shape == (sources.SYNTHETIC_SAMPLES, 2, 3)
    assert torch.equal(a, b)
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1.0) < 0.1  # standard normal
    assert not torch.equal(a, _collect(sources.synthetic((2, 3), seed=1), 16)[1])


def test_synthetic_does_not_depend_on_batch_size() -> None:
    a = _collect(sources.synthetic((2, 3)), 16)[1]
    b = _collect(sources.synthetic((2, 3)), 64)[1]
    assert torch.equal(a, b)


def test_synthetic_needs_a_shape() -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        sources.from_object(None)
    with pytest.raises(UsageError):
        sources.synthetic((3, 0, 4))


def test_synthetic_through_analyze_is_reproducible() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    first = reluscope.analyze(model, None, input_shape=(6,), batch_size=32)
    second = reluscope.analyze(model, None, input_shape=(6,), batch_size=32)
    assert first.data["synthetic"] is True and first.data["samples"] == sources.SYNTHETIC_SAMPLES
    assert first.layers == second.layers
    assert any("synthetic" in w for w in first.warnings)


@pytest.mark.parametrize(("text", "shape"), [("3,224,224", (3, 224, 224)), ("1x8x8", (1, 8, 8)), ("16", (16,))])
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert sources.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "a,b", "3,-1", "0"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        sources.parse_shape(text)


# ----------------------------------------------------------------------------- empty / broken
def test_empty_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(InputError, match="no samples"):
        sources.from_path(tmp_path / "e.npy")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        sources.from_path(tmp_path / "e.npz")


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        sources.from_path(tmp_path / "nothing.npy")
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(InputError):
        sources.from_path(tmp_path / "data.csv")
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (")
    with pytest.raises(InputError):
        sources.from_path(tmp_path / "cut.npy")


def test_non_numeric_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.array(["a", "b", "c"]))
    with pytest.raises(InputError):
        _collect(sources.from_path(tmp_path / "s.npz"), 2)


@pytest.mark.parametrize("empty", [[], np.zeros((0, 4), dtype=np.float32), torch.zeros(0, 4)],
                         ids=["empty-list", "empty-array", "empty-tensor"])
def test_empty_in_memory_data(empty) -> None:
    """No samples is a data problem: exit code 2 in the CLI, and the message says so."""
    with pytest.raises(ReluscopeError, match="no samples") as info:
        reluscope.analyze(nn.Sequential(nn.ReLU()), empty)
    assert info.value.exit_code == 2


def test_empty_in_memory_data_is_an_input_error() -> None:
    with pytest.raises(InputError):
        reluscope.analyze(nn.Sequential(nn.ReLU()), np.zeros((0, 4), dtype=np.float32))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_max_samples_cuts_a_batch_of_an_iterable(kind: str) -> None:
    """--max-samples inside a batch of an iterable: numpy batches are cut as tensors are."""
    make = (lambda n: np.arange(n * 3, dtype=np.float32).reshape(n, 3)) if kind == "numpy" else \
        (lambda n: torch.arange(n * 3, dtype=torch.float32).reshape(n, 3))
    batches, xs, _ = _collect(sources.from_object([make(4), make(4)]), 4, max_samples=6)
    assert [b.size for b in batches] == [4, 2] and xs.shape == (6, 3)
