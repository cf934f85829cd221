"""reluscope.analyze as a library call: every data form, and the model and process handed back
exactly as they came, also when the forward pass raises midway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reluscope
from reluscope.errors import ModelRunError, ReluscopeError, UsageError

from conftest import global_hook_state, module_hook_state


class Net(nn.Module):
    """Conv + BatchNorm + a reused ReLU + a functional ReLU + Dropout: train/eval mode matters here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        x = self.drop(x.flatten(1))
        return F.relu(self.act(self.fc(x)) - 0.1)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture(scope="module")
def x(calib_x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(calib_x[:150].copy())


def _numbers(report: reluscope.Report) -> list[tuple[Any, ...]]:
    return [(l["name"], l["shape"], l["zero_fraction"], l["dead_units"], l["rarely_active_units"], l["min"], l["max"])
            for l in report.layers]


# ----------------------------------------------------------------------------- result
def test_analyze_returns_a_report(x: torch.Tensor) -> None:
    report = reluscope.analyze(make_net(), x, batch_size=32)
    assert isinstance(report, reluscope.Report)
    payload = report.to_dict()
    assert payload["schema_version"] == 1
    assert payload["model"]["format"] == "torch-module"
    assert payload["data"] == {"source": "in-memory array", "samples": 150, "synthetic": False}
    assert report.names == ["act#0", "act#1", "relu()"]
    assert json.loads(report.to_json()) == payload


def test_the_numbers_are_right(x: torch.Tensor) -> None:
    """A small independent check through the library API (the zoo test does the thorough one)."""
    model = make_net().eval()
    report = reluscope.analyze(model, x, batch_size=32)
    with torch.no_grad():
        a0 = torch.relu(model.bn(model.conv(x)))
        a1 = torch.relu(model.fc(a0.flatten(1)))
        a2 = torch.relu(a1 - 0.1)
    for name, t, axis in (("act#0", a0, 1), ("act#1", a1, 1), ("relu()", a2, 1)):
        layer = report.layer(name)
        per_unit = t.transpose(0, axis).reshape(t.shape[axis], -1)
        assert layer["zero_fraction"] == pytest.approx((t <= 0).double().mean().item(), abs=1e-12)
        assert layer["dead_units"] == torch.nonzero(per_unit.amax(1) <= 0).flatten().tolist()
        assert layer["max"] == pytest.approx(t.max().item(), rel=1e-6)


# ----------------------------------------------------------------------------- data forms
def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_every_data_form_gives_the_same_report(x: torch.Tensor, tmp_path: Path) -> None:
    model = make_net()
    labels = torch.arange(len(x)) % 10
    np.save(tmp_path / "x.npy", x.numpy())
    forms: dict[str, Any] = {
        "numpy": x.numpy(),
        "numpy float64": x.numpy().astype(np.float64),
        "path .npy": tmp_path / "x.npy",
        "path str": str(tmp_path / "x.npy"),
        "list of batches": _batches(x, 40),
        "list of numpy batches": [b.numpy() for b in _batches(x, 40)],
        "(x, y) batches": list(zip(_batches(x, 25), _batches(labels, 25))),
        "dict batches": [{"x": b, "y": l} for b, l in zip(_batches(x, 25), _batches(labels, 25))],
        "generator": (b for b in _batches(x, 64)),
    }
    base = reluscope.analyze(model, x, batch_size=32)
    for label, data in forms.items():
        report = reluscope.analyze(model, data, batch_size=32)
        assert report.data["samples"] == 150, label
        assert report.names == base.names, label
        for got, want in zip(report.layers, base.layers):
            assert (got["zero_fraction"], got["dead_units"], got["rarely_active_units"]) == \
                (want["zero_fraction"], want["dead_units"], want["rarely_active_units"]), label
            for key in ("min", "max", "mean"):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (label, key)


def test_labels_are_not_fed_to_the_model(x: torch.Tensor) -> None:
    """(x, y) batches: the model takes one argument, so passing y along would raise."""
    seen: list[int] = []

    class OneInput(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            seen.append(inp.shape[0])
            return torch.relu(inp)

    reluscope.analyze(OneInput(), [(x[:10], torch.zeros(10, dtype=torch.long)), (x[10:13], torch.ones(3).long())])
    assert seen == [10, 3]


def test_an_xy_tuple_is_a_data_set_like_its_saved_form(x: torch.Tensor) -> None:
    labels = torch.arange(len(x)) % 10
    report = reluscope.analyze(make_net(), (x, labels), batch_size=32)
    assert report.data["samples"] == 150


def test_a_generator_is_streamed_not_collected(x: torch.Tensor) -> None:
    events: list[str] = []

    class Recorder(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            events.append(f"forward {inp.shape[0]}")
            return torch.relu(inp)

    def generate() -> Iterator[torch.Tensor]:
        for i, batch in enumerate(_batches(x, 15)):
            events.append("yield")
            yield batch

    report = reluscope.analyze(Recorder(), generate())
    assert report.data["samples"] == 150
    assert events.count("yield") == 10 and events.count("forward 15") == 10
    for k in range(10):  # the k-th forward runs before the (k+3)-th batch is pulled: a lookahead of one at most
        assert events[:_nth(events, "forward 15", k)].count("yield") <= k + 2


def _nth(events: list[str], item: str, k: int) -> int:
    return [i for i, e in enumerate(events) if e == item][k]


def test_max_samples_stops_a_generator_early(x: torch.Tensor) -> None:
    pulled: list[int] = []

    def generate() -> Iterator[torch.Tensor]:
        for i, batch in enumerate(_batches(x, 20)):
            pulled.append(i)
            yield batch

    report = reluscope.analyze(make_net(), generate(), max_samples=50)
    assert report.data["samples"] == 50
    assert report.layer("act#0")["samples"] == 50
    assert pulled[:3] == [0, 1, 2] and len(pulled) <= 4  # the third batch is cut to 10; the rest is never pulled


def test_multi_input_models_take_dict_batches() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 5)
            self.b = nn.Linear(2, 5)

        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return F.relu(self.a(left) + self.b(right))

    torch.manual_seed(0)
    model = TwoInputs()
    left, right = torch.randn(12, 3), torch.randn(12, 2)
    report = reluscope.analyze(model, [{"left": left[:6], "right": right[:6]}, {"left": left[6:], "right": right[6:]}])
    with torch.no_grad():
        expected = F.relu(model.a(left) + model.b(right))
    layer = report.layer("relu()")
    assert layer["units"] == 5 and report.data["samples"] == 12
    assert layer["zero_fraction"] == pytest.approx((expected <= 0).double().mean().item(), abs=1e-12)


def test_bad_data_and_model_arguments() -> None:
    with pytest.raises(UsageError):
        reluscope.analyze(make_net(), 3.5)
    with pytest.raises(UsageError):
        reluscope.analyze(object(), torch.zeros(2, 1, 8, 8))
    with pytest.raises(UsageError):
        reluscope.analyze(make_net(), torch.zeros(2, 1, 8, 8), batch_size=0)
    with pytest.raises(UsageError):
        reluscope.analyze(make_net(), None)  # neither data nor an input shape


# ----------------------------------------------------------------------------- handed back as it came
def _mixed_mode(model: Net) -> dict[str, bool]:
    model.train()
    model.bn.eval()  # a frozen BatchNorm inside a training model
    return {name: m.training for name, m in model.named_modules()}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_model_is_handed_back_as_it_came(x: torch.Tensor, clean_global_state: None) -> None:
    model = make_net()
    model.bn.momentum = 1.0  # any BatchNorm update in train mode would be plain to see
    modes = _mixed_mode(model)
    model.bn.train()
    modes["bn"] = True
    calls: list[str] = []
    handle = model.fc.register_forward_hook(lambda m, i, o: calls.append("user hook"))
    hooks = module_hook_state(model)
    weights = _snapshot(model)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}

    reluscope.analyze(model, x, batch_size=64)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert module_hook_state(model) == hooks  # ours are gone, the user's is still there
    assert calls == ["user hook"] * 3  # the user's hook kept working during the analysis
    for key, value in _snapshot(model).items():  # BatchNorm statistics untouched: analysed in eval mode
        assert torch.equal(value, weights[key]), key
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.device.type == "cpu" for p in model.parameters())
    handle.remove()
    assert all(len(v) == 0 for v in module_hook_state(model).values())


def test_gradient_mode_hands_back_requires_grad_and_grads(x: torch.Tensor, clean_global_state: None) -> None:
    model = make_net()
    model.conv.weight.requires_grad_(False)  # a frozen layer
    model.fc.bias.grad = torch.full_like(model.fc.bias, 7.0)  # a gradient the user has accumulated
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    weights = _snapshot(model)
    labels = torch.arange(len(x)) % 10
    report = reluscope.analyze(model, list(zip(_batches(x, 50), _batches(labels, 50))), gradients=True)
    assert report.names == ["act#0", "act#1", "relu()"]
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, p in model.named_parameters():
        if grads[k] is None:
            assert p.grad is None, k
        else:
            assert torch.equal(p.grad, grads[k]), k
    for key, value in _snapshot(model).items():
        assert torch.equal(value, weights[key]), key


def test_dropout_is_off_during_analysis(x: torch.Tensor) -> None:
    model = make_net().train()
    first = reluscope.analyze(model, x)
    second = reluscope.analyze(model, x)
    assert _numbers(first) == _numbers(second)  # a train-mode Dropout would make these differ
    assert model.training and model.drop.training


class RaisesOnSecondBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.act = nn.ReLU()
        self.calls = 0

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.act(self.fc(inp.flatten(1)))
        if self.calls == 2:
            raise RuntimeError("boom on the second batch")
        return F.relu(y)


def test_state_is_restored_when_forward_raises(x: torch.Tensor, clean_global_state: None) -> None:
    torch.manual_seed(0)
    model = RaisesOnSecondBatch().train()
    model.act.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    hooks = module_hook_state(model)
    with pytest.raises(ModelRunError, match="boom on the second batch") as info:
        reluscope.analyze(model, x, batch_size=32)
    assert "sample 32" in str(info.value)  # the batch that failed
    assert isinstance(info.value, ReluscopeError) and info.value.exit_code == 2
    assert model.calls == 2
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert module_hook_state(model) == hooks
    assert all(v == 0 for v in global_hook_state().values())
    # the process is usable afterwards: a fresh analysis works and sees a clean state
    model.calls = 10
    report = reluscope.analyze(model, x, batch_size=32)
    assert report.names == ["act", "relu()"]


def test_state_is_restored_when_the_data_source_raises(x: torch.Tensor, clean_global_state: None) -> None:
    def broken() -> Iterator[torch.Tensor]:
        yield x[:10]
        raise OSError("disk went away")

    model = make_net().train()
    with pytest.raises(OSError, match="disk went away"):
        reluscope.analyze(model, broken())
    assert model.training and all(m.training for m in model.modules())
    assert all(v == 0 for v in global_hook_state().values())


def test_no_state_leaks_across_many_runs(x: torch.Tensor, clean_global_state: None) -> None:
    model = make_net()
    first = reluscope.analyze(model, x[:40])
    for _ in range(3):
        assert _numbers(reluscope.analyze(model, x[:40])) == _numbers(first)


def test_scripted_module_passed_directly(x: torch.Tensor, clean_global_state: None) -> None:
    model = make_net().eval()
    scripted = torch.jit.script(make_net()).train()
    report = reluscope.analyze(scripted, x, batch_size=50)
    eager = reluscope.analyze(model, x, batch_size=50)
    assert report.model["format"] == "torchscript"
    assert scripted.training  # flag restored
    assert report.names == eager.names
    for got, want in zip(report.layers, eager.layers):
        assert (got["zero_fraction"], got["dead_units"]) == (want["zero_fraction"], want["dead_units"])
        assert got["max"] == pytest.approx(want["max"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_analysis_hands_the_model_back_on_cpu(x: torch.Tensor, clean_global_state: None) -> None:
    model = make_net()
    cpu = reluscope.analyze(model, x, device="cpu")
    gpu = reluscope.analyze(model, x, device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert gpu.run["device"].startswith("cuda")
    assert [l["dead_units"] for l in gpu.layers] == [l["dead_units"] for l in cpu.layers]
