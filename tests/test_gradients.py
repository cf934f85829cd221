"""Gradient flow (--gradients): verdicts on planted pathologies, norms equal to plain autograd,
every PyTorch format, ONNX declined plainly, and the model handed back untouched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope.cli import app
from reluscope.errors import UsageError
from conftest import arch_spec


def _mlp(depth: int, width: int = 16, scale: float = 1.0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    features = 8
    for _ in range(depth):
        linear = nn.Linear(features, width)
        with torch.no_grad():
            linear.weight.mul_(scale)
        layers += [linear, nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 4))
    return nn.Sequential(*layers)


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def test_deep_scaled_down_mlp_is_vanishing_and_shallow_default_is_ok() -> None:
    x, y = _data()
    deep = reluscope.analyze(_mlp(12, scale=0.3), (x, y), gradients=True).gradient_flow
    shallow = reluscope.analyze(_mlp(2), (x, y), gradients=True).gradient_flow
    assert deep["verdict"] == "vanishing" and deep["first_to_last_ratio"] < 1e-3
    assert shallow["verdict"] == "ok" and 1e-3 <= shallow["first_to_last_ratio"] <= 1e3
    assert deep["first_layer"] == "0.weight" and deep["last_layer"] == "24.weight"
    assert deep["loss"] == shallow["loss"] == "cross-entropy"


def test_tiny_first_layer_and_large_head_is_exploding() -> None:
    # grad W_first ~ |W_head| |x| and grad W_head ~ |activations|, which the tiny first layer keeps
    # small: the first layer's gradient is about 1e6 times the last one's.
    model = _mlp(4)
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        for module in model:
            if isinstance(module, nn.Linear):
                module.bias.zero_()
        model[-1].weight.mul_(1e3)
    x, y = _data()
    flow = reluscope.analyze(model, (x, y), gradients=True).gradient_flow
    assert flow["verdict"] == "exploding" and flow["first_to_last_ratio"] > 1e3


def test_parameter_and_site_gradients_equal_plain_autograd_on_one_batch() -> None:
    model = _mlp(3).eval()
    x, y = _data(32)
    report = reluscope.analyze(model, [(x, y)], gradients=True)

    reference = copy.deepcopy(model)
    outputs: list[torch.Tensor] = []
    for module in reference:
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda _m, _i, out: (out.retain_grad(), outputs.append(out)) and None)
    loss = nn.functional.cross_entropy(reference(x), y)
    loss.backward()
    expected = {name: p.grad.norm().item() for name, p in reference.named_parameters()}
    got = {p["name"]: p for p in report.gradient_flow["parameters"]}
    assert list(got) == list(expected)
    for name, norm in expected.items():
        assert got[name]["grad_norm"] == pytest.approx(norm, rel=1e-5)
        weight = dict(model.named_parameters())[name].detach().norm().item()
        assert got[name]["weight_norm"] == pytest.approx(weight, rel=1e-6)
        assert got[name]["ratio"] == pytest.approx(norm / weight, rel=1e-5)
    assert report.gradient_flow["loss_mean"] == pytest.approx(loss.item(), rel=1e-6)
    for layer, out in zip(report.layers, outputs):
        g = out.grad
        assert layer["gradient"]["rms"] == pytest.approx(g.pow(2).mean().sqrt().item(), rel=1e-5)
        assert layer["gradient"]["zero_fraction"] == pytest.approx((g == 0).float().mean().item(), abs=0)


def test_norms_are_the_root_mean_square_over_batches() -> None:
    model = _mlp(2).eval()
    x, y = _data(40)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    report = reluscope.analyze(model, batches, gradients=True)
    per_batch = []
    for bx, by in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(bx), by), list(model.parameters()))
        per_batch.append([g.norm().item() for g in grads])
    for i, entry in enumerate(report.gradient_flow["parameters"]):
        rms = ((per_batch[0][i] ** 2 + per_batch[1][i] ** 2) / 2) ** 0.5
        assert entry["grad_norm"] == pytest.approx(rms, rel=1e-5)
    assert report.gradient_flow["batches"] == 2


def test_loss_follows_the_data_and_the_output() -> None:
    x, y = _data(16)
    classifier = _mlp(1)
    assert reluscope.analyze(classifier, (x, y), gradients=True).gradient_flow["loss"] == "cross-entropy"
    assert reluscope.analyze(classifier, x, gradients=True).gradient_flow["loss"] == "predicted-class"
    regressor = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    assert reluscope.analyze(regressor, x, gradients=True).gradient_flow["loss"] == "half-squared-norm"
    chosen = reluscope.analyze(classifier, (x, y), gradients=True, loss="half-squared-norm")
    assert chosen.gradient_flow["loss"] == "half-squared-norm"
    with pytest.raises(UsageError, match="needs labels"):
        reluscope.analyze(classifier, x, gradients=True, loss="cross-entropy")
    with pytest.raises(UsageError, match="not one of"):
        reluscope.analyze(classifier, x, gradients=True, loss="hinge")


def test_model_is_handed_back_unchanged() -> None:
    model = _mlp(3).train()
    model[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    reluscope.analyze(model, _data(32), gradients=True)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())


def test_frozen_parameters_are_still_measured() -> None:
    model = _mlp(2)
    for p in model.parameters():
        p.requires_grad_(False)
    flow = reluscope.analyze(model, _data(16), gradients=True).gradient_flow
    assert all(p["grad_norm"] > 0 for p in flow["parameters"])
    assert not any(p.requires_grad for p in model.parameters())


def test_nonfinite_gradients_are_counted() -> None:
    model = _mlp(1)
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    flow = reluscope.analyze(model, _data(16), gradients=True).gradient_flow
    assert flow["nonfinite"] > 0


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp"])
def test_every_pytorch_format_gives_the_same_gradient_flow(name: str, samples_dir: Path, calib_path: Path) -> None:
    reports = [
        reluscope.analyze(samples_dir / f"{name}.pt", calib_path, arch=arch_spec(name), gradients=True),
        reluscope.analyze(samples_dir / f"{name}.pt2", calib_path, gradients=True),
        reluscope.analyze(samples_dir / f"{name}.torchscript", calib_path, gradients=True, trust_checkpoint=True),
    ]
    base = reports[0]
    for other in reports[1:]:
        assert other.gradient_flow["verdict"] == base.gradient_flow["verdict"]
        assert other.gradient_flow["loss"] == base.gradient_flow["loss"] == "cross-entropy"
        for a, b in zip(base.gradient_flow["parameters"], other.gradient_flow["parameters"]):
            assert a["name"] == b["name"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for a, b in zip(base.layers, other.layers):
            assert b["gradient"]["rms"] == pytest.approx(a["gradient"]["rms"], rel=1e-4)
            assert b["gradient"]["zero_fraction"] == pytest.approx(a["gradient"]["zero_fraction"], abs=1e-6)


def test_onnx_says_gradients_need_the_pytorch_model(samples_dir: Path, calib_path: Path) -> None:
    report = reluscope.analyze(samples_dir / "digits_cnn.onnx", calib_path, gradients=True)
    assert report.gradient_flow == {"available": False, "reason": report.gradient_flow["reason"]}
    assert "PyTorch model" in report.gradient_flow["reason"]
    assert len(report.layers) == 3 and all("gradient" not in layer for layer in report.layers)


def test_cli_shows_the_gradient_flow_view(samples_dir: Path, calib_path: Path) -> None:
    result = CliRunner().invoke(app, ["analyze", str(samples_dir / "digits_mlp.pt2"), "--data", str(calib_path),
                                      "--gradients"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "gradient flow" in result.output and "verdict: ok" in result.output
    assert "fc1.weight" in result.output and "grad rms" in result.output
