"""Weights as training code and hubs save them, each loaded into the --arch model and analysed to the
same statistics as the plain state_dict: .safetensors (read without the safetensors package),
sharded safetensors with their index, .bin loaded weights-only, training checkpoints (Lightning
.ckpt, `model_state`, EMA copies, `module.`/`model.`/`_orig_mod.` prefixes); where --arch modules
and trusted pickles find their code; torch.export archives with a fixed batch size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import reluscope
from reluscope.backends import detect_format
from reluscope.backends.torch.weight_files import read_safetensors
from reluscope.errors import InputError, UnsafeCheckpointError

from conftest import ARCHITECTURES, CALIB, SAMPLES, arch_spec

MLP = arch_spec("digits_mlp")


def _sd() -> dict[str, torch.Tensor]:
    return torch.load(SAMPLES / "digits_mlp.pt", weights_only=True)


def _fingerprint(report: reluscope.Report) -> list[tuple[Any, ...]]:
    return [(l["name"], l["units"], l["zero_fraction"], l["dead_units"], l["min"], l["max"], l["samples"])
            for l in report.layers]


@pytest.fixture(scope="module")
def base() -> list[tuple[Any, ...]]:
    return _fingerprint(reluscope.analyze(SAMPLES / "digits_mlp.pt", CALIB, arch=MLP, batch_size=100))


def _analyze(path: Path, **options: Any) -> reluscope.Report:
    return reluscope.analyze(path, CALIB, arch=MLP, batch_size=100, **options)


# ---------------------------------------------------------------------------------------------- safetensors
def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The format as documented (8-byte header length, JSON header, raw bytes), written without its package."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.float64: "F64", torch.uint8: "U8", torch.bool: "BOOL"}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_safetensors_with_arch(tmp_path: Path, base: list) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _sd(), {"format": "pt"})
    assert detect_format(path) == "safetensors"
    report = _analyze(path)
    assert report.model["format"] == "torch-state-dict"
    assert _fingerprint(report) == base


def test_safetensors_reader_agrees_with_the_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(7), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    path = tmp_path / "mixed.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "pt"})
    mine, theirs = read_safetensors(path), st.load_file(str(path))
    assert list(mine) == list(theirs)
    for name in theirs:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("damage", ["truncated", "huge-header", "bad-offsets"])
def test_damaged_safetensors_is_one_input_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _sd())
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "huge-header":
        path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    else:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        header["fc1.weight"]["data_offsets"][1] += 4
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    with pytest.raises(InputError, match="safetensors|ONNX"):
        _analyze(path)


def _shard(tmp_path: Path, count: int = 2, *, index: bool = True, suffix: str = "safetensors") -> Path:
    """save_pretrained's layout: model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    sd = _sd()
    names = list(sd)
    weight_map = {}
    for i in range(count):
        shard = f"model-{i + 1:05d}-of-{count:05d}.{suffix}"
        part = {name: sd[name] for name in names[i::count]}
        if suffix == "safetensors":
            write_safetensors(tmp_path / shard, part)
        else:
            torch.save(part, tmp_path / shard)
        weight_map.update({name: shard for name in part})
    index_name = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    if index:
        (tmp_path / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tmp_path / index_name


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_sharded_checkpoint_from_its_index(tmp_path: Path, base: list, suffix: str) -> None:
    index = _shard(tmp_path, 3, suffix=suffix)
    assert detect_format(index) == "weight-index"
    assert _fingerprint(_analyze(index)) == base


def test_a_shard_brings_the_others_through_the_index_beside_it(tmp_path: Path, base: list) -> None:
    _shard(tmp_path, 2)
    report = _analyze(tmp_path / "model-00002-of-00002.safetensors")
    assert _fingerprint(report) == base
    assert any("all 2 shards" in w for w in report.warnings)


def test_a_shard_without_its_index_names_what_to_give(tmp_path: Path) -> None:
    _shard(tmp_path, 2, index=False)
    with pytest.raises(InputError, match="shard 1 of 2 .* give the index"):
        _analyze(tmp_path / "model-00001-of-00002.safetensors")


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    index = _shard(tmp_path, 2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors"):
        _analyze(index)


def test_bin_weights_load_weights_only(tmp_path: Path, base: list) -> None:
    torch.save(_sd(), tmp_path / "pytorch_model.bin")
    assert _fingerprint(_analyze(tmp_path / "pytorch_model.bin")) == base

    class Evil:
        def __reduce__(self) -> Any:
            return (print, ("unpickled",))

    torch.save({**_sd(), "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        _analyze(tmp_path / "evil.bin")


# ---------------------------------------------------------------------------------------------- training checkpoints
def _prefixed(prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _sd().items()}


def _lightning() -> dict[str, Any]:
    """What a LightningModule with `self.model = DigitsMLP()` saves to a .ckpt."""
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
            "state_dict": _prefixed("model."),
            "loops": {"fit_loop": {"state_dict": {}}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}],
            "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}


@pytest.mark.parametrize("checkpoint", [
    _lightning,
    lambda: {"model_state": _prefixed("_orig_mod."), "optimizer_state": {"state": {}, "param_groups": []}, "epoch": 9},
    lambda: {"model_state_dict": _prefixed("module._orig_mod."), "epoch": 1},
    lambda: {"net": _prefixed("module.")},
    lambda: {"checkpoint": {"weights_ema": _sd()}},
    lambda: {"model": {"backbone": _prefixed("encoder.")}},
], ids=["lightning-ckpt", "model_state-compiled", "ddp-compiled", "net-ddp", "deeply-nested", "wrapper-prefix"])
def test_training_checkpoints_load(tmp_path: Path, base: list, checkpoint: Any) -> None:
    path = tmp_path / "run.ckpt"
    torch.save(checkpoint(), path)
    report = _analyze(path)
    assert report.model["format"] == "torch-state-dict"
    assert _fingerprint(report) == base


def test_the_weight_set_that_fits_the_architecture_is_chosen(tmp_path: Path, base: list) -> None:
    cnn = torch.load(SAMPLES / "digits_cnn.pt", weights_only=True)
    path = tmp_path / "two.pt"
    torch.save({"model_state_dict": cnn, "ema": _sd()}, path)  # the first key holds another model
    assert _fingerprint(_analyze(path)) == base


def test_equally_fitting_weight_sets_prefer_the_trained_ones_and_say_so(tmp_path: Path, base: list) -> None:
    ema = {k: v * 0 for k, v in _sd().items()}  # every unit dead
    path = tmp_path / "both.pt"
    torch.save({"ema": ema, "model_state_dict": _sd()}, path)
    report = _analyze(path)
    assert _fingerprint(report) == base
    assert any("several weight sets" in w and "['model_state_dict']" in w for w in report.warnings)


def test_a_real_mismatch_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = _sd()
    sd["extra.weight"] = torch.zeros(2)
    del sd["head.bias"]
    path = tmp_path / "partial.pt"
    torch.save({"model_state": sd}, path)
    with pytest.raises(InputError, match=r"do not fit the --arch model \(missing head\.bias; unexpected extra\.weight\)"):
        _analyze(path)


# ---------------------------------------------------------------------------------------------- where code is found
def test_arch_module_beside_the_model_and_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                base: list) -> None:
    models = tmp_path / "models"
    (models / "zoo_beside").mkdir(parents=True)
    (models / "zoo_beside" / "__init__.py").write_text("")
    (models / "zoo_beside" / "nets.py").write_text(ARCHITECTURES.read_text())
    torch.save(_sd(), models / "mlp.pt")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "zoo_here").mkdir(parents=True)
    (elsewhere / "zoo_here" / "__init__.py").write_text("from .nets import digits_mlp\n")
    (elsewhere / "zoo_here" / "nets.py").write_text(ARCHITECTURES.read_text())
    monkeypatch.chdir(elsewhere)
    path_before = list(sys.path)
    for spec in ("zoo_beside.nets:digits_mlp", "zoo_here:digits_mlp"):
        report = reluscope.analyze(models / "mlp.pt", CALIB, arch=spec, batch_size=100)
        assert _fingerprint(report) == base
    assert sys.path == path_before  # the folders were importable only while loading


def test_arch_file_imports_its_neighbours(tmp_path: Path, base: list) -> None:
    (tmp_path / "layers_helper.py").write_text(ARCHITECTURES.read_text())
    (tmp_path / "build.py").write_text("from layers_helper import digits_mlp\n\ndef make():\n    return digits_mlp()\n")
    report = reluscope.analyze(SAMPLES / "digits_mlp.pt", CALIB, arch=f"{tmp_path / 'build.py'}:make", batch_size=100)
    assert _fingerprint(report) == base


def test_trusted_pickle_finds_its_class_beside_the_model(tmp_path: Path, cli_env: dict[str, str]) -> None:
    (tmp_path / "mynet.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n    pass\n")
    (tmp_path / "save.py").write_text(textwrap.dedent("""
        import torch, mynet
        torch.manual_seed(0)
        torch.save(mynet.Net(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU()), "net.pt")
    """))
    subprocess.run([sys.executable, "save.py"], cwd=tmp_path, check=True, env=cli_env)
    report = reluscope.analyze(tmp_path / "net.pt", CALIB, trust_checkpoint=True, batch_size=100)
    assert report.model["format"] == "torch-pickle" and report.layers[0]["units"] == 8


def test_a_module_pickled_from_main_gets_a_hint(tmp_path: Path, cli_env: dict[str, str]) -> None:
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(64, 8)
            def forward(self, x):
                return torch.relu(self.fc(x.flatten(1)))
        torch.save(Net(), "net.pt")
    """))
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True, env=cli_env)
    with pytest.raises(InputError, match=r"__main__.*save model\.state_dict\(\) and pass --arch"):
        reluscope.analyze(tmp_path / "net.pt", CALIB, trust_checkpoint=True)


# ---------------------------------------------------------------------------------------------- .pt2, fixed batch
@pytest.fixture(scope="module")
def fixed_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reluscope_test_arch", ARCHITECTURES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.digits_mlp()
    model.load_state_dict(_sd())
    path = tmp_path_factory.mktemp("pt2") / "fixed4.pt2"
    torch.export.save(torch.export.export(model.eval(), (torch.zeros(4, 1, 8, 8),)), path)
    return path


@pytest.mark.parametrize("batch_size", [4, 10, 100])
def test_fixed_batch_pt2_runs_at_any_batch_size(fixed_pt2: Path, base: list, batch_size: int) -> None:
    report = reluscope.analyze(fixed_pt2, CALIB, batch_size=batch_size)
    assert report.model["format"] == "torch-export"
    got = _fingerprint(report)
    assert [row[:4] + row[6:] for row in got] == [row[:4] + row[6:] for row in base]  # names, units, zeros, dead, samples
    for mine, theirs in zip(got, base):
        assert mine[4:6] == pytest.approx(theirs[4:6], rel=1e-5)  # min, max: the graph computes in its own order
    assert any("fixed batch size of 4" in w for w in report.warnings) == (batch_size != 4)


def test_fixed_batch_pt2_with_gradients_names_the_size(fixed_pt2: Path) -> None:
    with pytest.raises(InputError, match="fixed batch size of 4"):
        reluscope.analyze(fixed_pt2, CALIB, batch_size=10, gradients=True)
