"""Hugging Face model folders and text calibration data.

A tiny BERT (hidden_act gelu) is built from a config, given planted dead units (some rows of the
first intermediate dense layer zeroed, their bias very negative, so those GELU features never
turn positive) and saved with save_pretrained beside its tokenizer. Analysed from a texts file
whose texts differ in length (so batches are padded), every site's dead set, active share and
range must equal a reference computed here with forward hooks on the same model over the real
tokens only (the attention mask), and must differ from what counting padding would give.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope.cli import app
from reluscope.errors import InputError, UnsafeCheckpointError, UsageError

transformers = pytest.importorskip("transformers")

WORDS = ("the a cat dog sat on mat ran fast slow red blue big small house tree and of to in it was very "
         "green old young bird sang loud quiet river flowed under bridge").split()
DEAD = (0, 1, 2, 3, 4)  # planted in encoder.layer.0.intermediate
TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "the big red house and the small blue tree",
    "slow",
    "a young bird sang very loud under the old bridge and the river flowed",
    "it was green",
    "the dog ran fast to the river",
    "quiet",
    "the old cat and the young dog sat in the house",
    "a blue bird",
    "red",
    "the tree was very big and very old",
]


def build_hf_folder(folder: Path, *, tokenizer: bool = True, seed: int = 0, act: str = "gelu") -> nn.Module:
    """A tiny BERT with dead units planted, saved as save_pretrained does (config.json, model.safetensors,
    tokenizer files)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, hidden_act=act,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        dense = model.encoder.layer[0].intermediate.dense
        dense.weight[list(DEAD)] = 0.0
        dense.bias[list(DEAD)] = -10.0  # gelu(-10) < 0: never active
    model.save_pretrained(folder)
    if tokenizer:
        vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
        transformers.BertTokenizer(vocab=vocab).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    build_hf_folder(folder)
    return folder


@pytest.fixture(scope="module")
def texts_file(hf_folder: Path) -> Path:
    path = hf_folder.parent / "texts.txt"
    path.write_text("\n".join(TEXTS[:6]) + "\n\n" + "\n".join(TEXTS[6:]) + "\n")  # a blank line is skipped
    return path


def reference(folder: Path, texts: list[str], batch_size: int, max_length: int = 128, *,
              real_only: bool = True) -> dict[str, dict[str, Any]]:
    """Per GELU site, with forward hooks on the reloaded model: dead units, active share, min, max over the
    real tokens (or, with real_only=False, over every position, padding included)."""
    model = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    seen: dict[str, list[torch.Tensor]] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name: str) -> Any:
        def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            values = output[mask_now[0]] if real_only else output.reshape(-1, output.shape[-1])
            seen.setdefault(name, []).append(values.detach())
        return keep

    for index, layer in enumerate(model.encoder.layer):
        layer.intermediate.intermediate_act_fn.register_forward_hook(
            hook(f"encoder.layer.{index}.intermediate.intermediate_act_fn.gelu()"))
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            mask_now[:] = [encoded["attention_mask"].bool()]
            model(**encoded)
    result = {}
    for name, chunks in seen.items():
        values = torch.cat(chunks)
        active = (values > 0).sum(0)
        result[name] = {"dead": [u for u, a in enumerate(active.tolist()) if a == 0],
                        "zero_fraction": 1.0 - active.sum().item() / values.numel(),
                        "min": values.min().item(), "max": values.max().item(), "tokens": values.shape[0]}
    return result


def _check(report: dict[str, Any], expected: dict[str, dict[str, Any]], samples: int) -> None:
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert list(layers) == list(expected)
    for name, want in expected.items():
        layer = layers[name]
        assert layer["units"] == 32 and layer["samples"] == samples
        assert layer["dead_units"] == want["dead"], name
        assert layer["zero_fraction"] == pytest.approx(want["zero_fraction"], abs=1e-12), name
        assert layer["min"] == pytest.approx(want["min"], rel=1e-5, abs=1e-6)
        assert layer["max"] == pytest.approx(want["max"], rel=1e-5, abs=1e-6)


runner = CliRunner()


def _cli(*args: str) -> Any:
    return runner.invoke(app, list(map(str, args)), env={"NO_COLOR": "1", "COLUMNS": "200"})


def test_folder_and_texts_from_the_command_line(hf_folder: Path, texts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = _cli("analyze", hf_folder, "--data", texts_file, "-b", "5", "-f", "json", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model"]["format"] == "huggingface"
    assert report["data"]["samples"] == len(TEXTS)
    expected = reference(hf_folder, TEXTS, 5)
    _check(report, expected, len(TEXTS))
    first = report["layers"][0]
    assert set(DEAD) <= set(first["dead_units"])
    # padding counted would give other numbers: the exclusion is what makes these equal
    padded = reference(hf_folder, TEXTS, 5, real_only=False)
    assert any(padded[name]["zero_fraction"] != want["zero_fraction"] or padded[name]["dead"] != want["dead"]
               for name, want in expected.items())


@pytest.mark.parametrize("batch_size", [1, 4, 12])
def test_statistics_do_not_depend_on_the_padding(hf_folder: Path, texts_file: Path, batch_size: int) -> None:
    report = reluscope.analyze(hf_folder, texts_file, batch_size=batch_size).to_dict()
    _check(report, reference(hf_folder, TEXTS, batch_size), len(TEXTS))


def test_jsonl_and_max_length(hf_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    report = reluscope.analyze(hf_folder, path, batch_size=5, max_length=6).to_dict()
    _check(report, reference(hf_folder, TEXTS, 5, max_length=6), len(TEXTS))


def test_token_ids_in_npz(hf_folder: Path, tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder, local_files_only=True)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="np")  # padded once, to the longest of all
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
             token_type_ids=encoded["token_type_ids"])
    report = reluscope.analyze(hf_folder, path, batch_size=5).to_dict()
    expected = reference(hf_folder, TEXTS, 5)
    layers = {layer["name"]: layer for layer in report["layers"]}
    for name, want in expected.items():  # other padding, same real tokens
        assert layers[name]["dead_units"] == want["dead"]
        assert layers[name]["zero_fraction"] == pytest.approx(want["zero_fraction"], abs=1e-12)
        assert layers[name]["samples"] == len(TEXTS)


class _Pooled(nn.Module):
    """A token site ([batch, seq, hidden]) and a pooled one ([batch, hidden]); the padding token's embedding
    is large in feature 0, which no real token activates."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[5.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [-1.0, 2.0, 1.0],
                                                  [-2.0, 1.0, 1.0]]))
        self.act = nn.ReLU()
        self.head = nn.Linear(3, 2)
        self.act2 = nn.ReLU()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.act(self.embed(input_ids))
        return self.act2(self.head(tokens.mean(1)))


def test_padding_does_not_make_units_look_alive() -> None:
    ids = torch.tensor([[1, 2, 3, 0, 0], [2, 3, 0, 0, 0], [1, 1, 1, 1, 2]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    report = reluscope.analyze(_Pooled(), [batch])
    token, pooled = report.layers
    assert token["name"] == "act" and token["units"] == 3 and token["samples"] == 3
    assert token["dead_units"] == [0]  # alive only at padding positions
    # 10 real tokens x 3 units, 15 active (ids 1: unit 1; ids 2 and 3: units 1 and 2); padding would add 5 x 3
    assert token["zero_fraction"] == pytest.approx(1 - 15 / 30)
    assert token["max"] == 2.0  # the padding's 5.0 is not seen
    assert any("act2" in w and "measured at every position" in w for w in report.warnings)
    assert pooled["samples"] == 3


def test_install_hint_without_transformers(hf_folder: Path, texts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(UsageError, match=r'needs the transformers package.*pip install "reluscope\[hf\]"'):
        reluscope.analyze(hf_folder, texts_file)


def test_missing_files_are_input_errors_and_nothing_is_downloaded(tmp_path: Path, texts_file: Path) -> None:
    folder = tmp_path / "no-weights"
    build_hf_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has no weights"):
        reluscope.analyze(folder, texts_file)
    bare = tmp_path / "no-tokenizer"
    build_hf_folder(bare, tokenizer=False)
    with pytest.raises(InputError, match="has no tokenizer files"):
        reluscope.analyze(bare, texts_file)


def test_custom_code_needs_trust(tmp_path: Path, texts_file: Path) -> None:
    folder = tmp_path / "custom"
    build_hf_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpointError, match="custom model code"):
        reluscope.analyze(folder, texts_file)


def test_text_data_needs_a_tokenizer(tmp_path: Path, texts_file: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        reluscope.analyze(model, texts_file)


def test_transformers_is_imported_only_for_a_folder(cli_env: dict[str, str]) -> None:
    from conftest import CALIB, SAMPLES

    code = ("import sys, reluscope\n"
            f"reluscope.analyze({str(SAMPLES / 'digits_mlp.pt2')!r}, {str(CALIB)!r})\n"
            "from reluscope.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, check=True)
    assert "LOADED False" in out.stdout


def test_a_relu_transformer_folder_is_pruned_and_written_as_onnx(tmp_path: Path, texts_file: Path) -> None:
    import onnxruntime as ort

    folder = tmp_path / "relu-bert"
    build_hf_folder(folder, act="relu")
    target = tmp_path / "small.onnx"
    result = _cli("prune", str(folder), "--data", str(texts_file), "-o", str(target), "-f", "json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    first = next(site for site in report["sites"] if site["name"].startswith("encoder.layer.0."))
    assert set(DEAD) <= set(first["removed_units"]) and first["units_after"] == 32 - len(first["removed_units"])
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= 1e-5
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert {value.name for value in session.get_inputs()} >= {"input_ids", "attention_mask"}
