"""The committed sample models in every PyTorch format, and the checkpoint safety rules.

The dead-unit counts to expect come from sample_models/manifest.json, written by
sample_models/train.py from its own hand-written forward pass, and are recomputed here with
numpy from the weights for digits_mlp_dead.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import reluscope
from reluscope.errors import InputError, UnsafeCheckpointError, UsageError

from conftest import arch_spec

MODELS = ["digits_mlp", "digits_cnn", "digits_mlp_dead"]
TORCH_FORMATS = {"state_dict": "torch-state-dict", "torchscript": "torchscript", "exported_program": "torch-export"}


def _entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in manifest["models"] if m["name"] == name)


def _analyze(samples_dir: Path, manifest: dict[str, Any], name: str, kind: str, calib: Path) -> reluscope.Report:
    entry = _entry(manifest, name)
    path = samples_dir / entry["files"][kind]
    factory = entry["architecture"].rsplit(":", 1)[1]
    arch = arch_spec(factory) if kind == "state_dict" else None
    return reluscope.analyze(path, calib, arch=arch, batch_size=100, trust_checkpoint=kind == "torchscript")


@pytest.fixture(scope="module")
def reports(samples_dir: Path, manifest: dict[str, Any], calib_path: Path) -> dict[tuple[str, str], reluscope.Report]:
    return {(name, kind): _analyze(samples_dir, manifest, name, kind, calib_path)
            for name in MODELS for kind in TORCH_FORMATS}


@pytest.mark.parametrize("name", MODELS)
def test_formats_agree_site_by_site(name: str, reports: dict, manifest: dict[str, Any], samples_dir: Path) -> None:
    base = reports[(name, "state_dict")]
    expected_names = {"digits_mlp": ["act1", "act2"], "digits_mlp_dead": ["act1", "act2"],
                      "digits_cnn": ["relu#0", "relu()", "relu#1"]}[name]
    assert base.names == expected_names
    for kind, fmt in TORCH_FORMATS.items():
        report = reports[(name, kind)]
        assert report.model["format"] == fmt
        path = samples_dir / _entry(manifest, name)["files"][kind]
        assert report.model["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert report.data["samples"] == 360 and report.data["synthetic"] is False
        assert report.names == base.names, kind
        assert report.unanalysed == []
        for got, want in zip(report.layers, base.layers):
            for key in ("op", "shape", "unit_axis", "units", "zero_fraction", "dead_units", "rarely_active_units",
                        "nonfinite"):
                assert got[key] == want[key], (kind, got["name"], key)
            for key in ("min", "max", "mean", "std"):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (kind, got["name"], key)


@pytest.mark.parametrize("name", MODELS)
def test_dead_units_match_the_manifest(name: str, reports: dict, manifest: dict[str, Any]) -> None:
    expected = list(_entry(manifest, name)["dead_units"].values())  # in forward order
    for kind in TORCH_FORMATS:
        layers = reports[(name, kind)].layers
        assert [(len(layer["dead_units"]), layer["units"]) for layer in layers] == \
            [(e["dead"], e["units"]) for e in expected], kind


def test_cnn_unit_axes(reports: dict) -> None:
    layers = reports[("digits_cnn", "state_dict")].layers
    assert [(l["shape"], l["unit_axis"]) for l in layers] == [([16, 8, 8], 0), ([32, 8, 8], 0), ([64], 0)]


def test_dead_mlp_against_numpy(reports: dict, samples_dir: Path, calib_x: np.ndarray) -> None:
    """digits_mlp_dead really has many dead units, at exactly the indices numpy finds."""
    sd = torch.load(samples_dir / "digits_mlp_dead.pt", weights_only=True)
    w1, b1, w2, b2 = (sd[k].double().numpy() for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    h1 = np.maximum(calib_x.reshape(len(calib_x), -1) @ w1.T + b1, 0)
    h2 = np.maximum(h1 @ w2.T + b2, 0)
    report = reports[("digits_mlp_dead", "state_dict")]
    for name, h in (("act1", h1), ("act2", h2)):
        layer = report.layer(name)
        assert layer["dead_units"] == np.flatnonzero(h.max(axis=0) <= 0).tolist()
        assert layer["zero_fraction"] == pytest.approx((h <= 0).mean(), abs=1e-12)
        assert layer["max"] == pytest.approx(h.max(), rel=1e-5)
    assert report.summary["dead_fraction"] > 0.3


# ----------------------------------------------------------------------------- checkpoint safety
def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_pickled_module_is_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(_tiny(), path)
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        reluscope.analyze(path, torch.randn(8, 4))


def test_pickled_module_loads_when_trusted(tmp_path: Path) -> None:
    model = _tiny()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    x = torch.randn(16, 4)
    trusted = reluscope.analyze(path, x, trust_checkpoint=True)
    direct = reluscope.analyze(model, x)
    assert trusted.model["format"] == "torch-pickle"
    assert trusted.names == direct.names == ["1"]
    assert trusted.layers[0]["zero_fraction"] == direct.layers[0]["zero_fraction"]


@pytest.mark.parametrize("wrap", [lambda sd: {"state_dict": sd}, lambda sd: {"model": sd, "epoch": 3}],
                         ids=["state_dict-key", "model-key-with-epoch"])
def test_nested_state_dicts_load(wrap, tmp_path: Path, samples_dir: Path, calib_path: Path, reports: dict) -> None:
    sd = torch.load(samples_dir / "digits_mlp.pt", weights_only=True)
    path = tmp_path / "nested.pt"
    torch.save(wrap(sd), path)
    report = reluscope.analyze(path, calib_path, arch=arch_spec("digits_mlp"), batch_size=100)
    base = reports[("digits_mlp", "state_dict")]
    assert report.model["format"] == "torch-state-dict"
    assert [(l["name"], l["zero_fraction"], l["dead_units"]) for l in report.layers] == \
        [(l["name"], l["zero_fraction"], l["dead_units"]) for l in base.layers]


def test_state_dict_without_arch_asks_for_arch(samples_dir: Path, calib_path: Path) -> None:
    with pytest.raises(UsageError, match="--arch"):
        reluscope.analyze(samples_dir / "digits_mlp.pt", calib_path)


def test_state_dict_with_the_wrong_arch(samples_dir: Path, calib_path: Path) -> None:
    with pytest.raises(InputError, match="do not fit"):
        reluscope.analyze(samples_dir / "digits_mlp.pt", calib_path, arch=arch_spec("digits_cnn"))


class _Payload:
    """Unpickling this object would call open(target, "w"): a file appears if code from the file runs."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_payload_in_torch_zip_is_refused_and_never_runs(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    path = tmp_path / "payload.pt"
    torch.save({"weights": torch.zeros(2), "extra": _Payload(target)}, path)
    assert not target.exists()
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        reluscope.analyze(path, torch.randn(2, 2), arch=arch_spec("digits_mlp"))
    assert not target.exists()


def test_payload_in_raw_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps(_Payload(target), protocol=2))
    assert not target.exists()
    with pytest.raises(InputError):
        reluscope.analyze(path, torch.randn(2, 2), arch=arch_spec("digits_mlp"))
    assert not target.exists()


def test_damaged_files_are_input_errors(tmp_path: Path, samples_dir: Path) -> None:
    for source in ("digits_mlp.pt", "digits_mlp.torchscript", "digits_mlp.pt2"):
        damaged = tmp_path / f"cut_{source}"
        damaged.write_bytes((samples_dir / source).read_bytes()[:300])
        with pytest.raises(InputError):
            reluscope.analyze(damaged, torch.randn(2, 1, 8, 8), arch=arch_spec("digits_mlp"),
                              trust_checkpoint=source.endswith(".torchscript"))  # damage, not the refusal
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        reluscope.analyze(empty, torch.randn(2, 1, 8, 8))
    with pytest.raises(InputError, match="not found"):
        reluscope.analyze(tmp_path / "missing.pt", torch.randn(2, 1, 8, 8))
