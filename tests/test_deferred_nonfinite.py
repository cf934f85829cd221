"""The accelerator route for NaN/Inf: statistics take the fast path with a device-side flag,
and a run whose flag fired is measured again NaN-safely. Forced on the CPU here (a torch backend
built with `NonfinitePolicy.DEFER`), it must give exactly the report of a run that is NaN-safe
from the start (`NonfinitePolicy.MASKED`); a clean run, that of the CPU's per-batch check."""

from __future__ import annotations

import torch
from torch import nn

import reluscope
from reluscope.backends.torch.backend import TorchBackend
from reluscope.measure import stats
from reluscope.measure.reductions import NonfinitePolicy, TorchReduction
from reluscope.measure.sites import classify


class CountingModel(nn.Module):
    """Linear + ReLU whose calls are counted; NaN rows in the input give NaN activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 5)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 3)
        self.act2 = nn.LeakyReLU(0.1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.act2(self.head(self.act(self.fc(x))))


def _data(poisoned: bool) -> torch.Tensor:
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    if poisoned:
        x[13, 2] = float("nan")
        x[27, 0] = float("inf")
    return x


def _comparable(report: reluscope.Report) -> list[dict]:
    return [{k: v for k, v in layer.items()} for layer in report.layers]


def deferred(model: nn.Module) -> TorchBackend:
    """`model` measured as on an accelerator: NaN/Inf checks deferred to one read at the end."""
    return TorchBackend.of_module(model, nonfinite=NonfinitePolicy.DEFER)


def _reference(x: torch.Tensor, policy: NonfinitePolicy = NonfinitePolicy.MASKED) -> reluscope.Report:
    return reluscope.analyze(TorchBackend.of_module(CountingModel(), nonfinite=policy), x, batch_size=8)


def test_poisoned_run_is_measured_again_and_matches_the_cpu_route() -> None:
    x = _data(poisoned=True)
    model = CountingModel()
    report = reluscope.analyze(deferred(model), x, batch_size=8)
    assert model.calls == 10  # 5 batches, measured twice
    assert report.summary["nonfinite"] > 0
    assert _comparable(report) == _comparable(_reference(x))


def test_clean_run_is_measured_once() -> None:
    x = _data(poisoned=False)
    model = CountingModel()
    report = reluscope.analyze(deferred(model), x, batch_size=8)
    assert model.calls == 5
    assert _comparable(report) == _comparable(_reference(x, NonfinitePolicy.CHECK))  # both the float32 fast path


def test_one_pass_generator_is_nan_safe_from_the_start() -> None:
    x = _data(poisoned=True)
    model = CountingModel()
    report = reluscope.analyze(deferred(model), (x[i:i + 8] for i in range(0, 40, 8)), batch_size=8)
    assert model.calls == 5  # cannot be read twice, so it was never deferred
    assert _comparable(report) == _comparable(_reference(x))


def test_deferred_update_raises_the_flag_without_masking() -> None:
    act = classify("relu")
    y = torch.relu(torch.randn(8, 4))
    y[1, 1] = float("nan")
    fast = stats.SiteStats(act, (4,), 0, torch.device("cpu"), reduction=TorchReduction(NonfinitePolicy.DEFER))
    fast.update(y)
    assert bool(fast.poisoned) and int(fast.nonfinite) == 0  # counted only by the NaN-safe re-run
    safe = stats.SiteStats(act, (4,), 0, torch.device("cpu"), reduction=TorchReduction(NonfinitePolicy.MASKED))
    safe.update(y)
    assert not bool(safe.poisoned) and int(safe.nonfinite) == 1


def test_a_list_of_batches_is_read_again_like_an_array() -> None:
    """A list can be iterated twice: it takes the fast route and is re-measured when poisoned,
    as arrays are (only true one-pass iterables pay for NaN-safety on every batch)."""
    x = _data(poisoned=True)
    model = CountingModel()
    report = reluscope.analyze(deferred(model), [x[i:i + 8] for i in range(0, 40, 8)])
    assert model.calls == 10
    assert _comparable(report) == _comparable(_reference(x))
