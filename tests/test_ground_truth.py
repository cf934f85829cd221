"""Ground truth: a "zoo" model that uses every ReLU-family form, with dead, rarely active and
dormant units planted on purpose, analysed through every PyTorch format.

Expected numbers are never taken from reluscope: `reference()` recomputes the model step by
step with hand-written activation formulas (and is checked against the model's own output),
and `expected_site()` turns its tensors into statistics with numpy, following the README's
definitions. The planted units are checked against that computation too, so the zoo really
holds exactly the units the test claims it does.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reluscope

N_SAMPLES = 200
BATCH = 64  # 200 = 64 + 64 + 64 + 8: several batches and a short last one
RARE = 0.01
TAU = 0.025
DEAD_BIAS = -1e4


# ----------------------------------------------------------------------------- the zoo
class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))  # functional, inside a submodule: "block.relu()"


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()  # called twice: act#0, act#1
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.block = Block(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.conv5 = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.relu_ip = nn.ReLU(inplace=True)
        self.conv6 = nn.Conv2d(8, 8, 1)
        self.relu6 = nn.ReLU6()
        self.pos_fc = nn.Linear(8, 6)  # a Linear on a 4-D tensor: units on the last axis
        self.conv1d = nn.Conv1d(8, 12, 3, padding=1)  # NCL: units on axis 0 of a 2-D per-sample shape
        self.fc1 = nn.Linear(12 * 48, 32)
        self.fc_leaky = nn.Linear(32, 16)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc_fleaky = nn.Linear(32, 16)
        self.fc_gelu = nn.Linear(32, 16)
        self.gelu = nn.GELU()
        self.fc_silu = nn.Linear(32, 16)
        self.silu = nn.SiLU()
        self.fc_elu = nn.Linear(32, 16)
        self.elu = nn.ELU()
        self.fc_prelu = nn.Linear(32, 16)
        self.prelu = nn.PReLU(16)
        self.fc_hswish = nn.Linear(32, 16)
        self.hardswish = nn.Hardswish()
        self.fc_mish = nn.Linear(32, 16)
        self.mish = nn.Mish()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.block(x)
        x = self.act(self.conv3(x))
        x = self.conv4(x)
        x.relu_()
        x = self.relu_ip(self.bn(self.conv5(x)))
        x = self.relu6(self.conv6(x))
        x = torch.clamp(self.pos_fc(x), min=0)
        x = F.relu(self.conv1d(x.flatten(2)))
        z = F.relu(self.fc1(x.flatten(1)))
        # Heads: each smooth activation feeds only the final sum, so the large negative outputs of
        # its planted dead unit cannot kill units of another site.
        h = self.leaky(self.fc_leaky(z))
        h = h + F.leaky_relu(self.fc_fleaky(z), 0.2)
        h = h + self.gelu(self.fc_gelu(z))
        h = h + self.silu(self.fc_silu(z))
        h = h + self.elu(self.fc_elu(z))
        h = h + self.prelu(self.fc_prelu(z))
        h = h + self.hardswish(self.fc_hswish(z))
        h = h + self.mish(self.fc_mish(z))
        return self.head(h)


# name, op, producing layer (whose bias sets the pre-activation), per-sample shape, unit axis
SITES: list[tuple[str, str, str, tuple[int, ...], int]] = [
    ("act#0", "relu", "conv1", (8, 8, 8), 0),
    ("relu()#0", "relu", "conv2", (8, 8, 8), 0),
    ("block.relu()", "relu", "block.conv", (8, 8, 8), 0),
    ("act#1", "relu", "conv3", (8, 8, 8), 0),
    ("relu()#1", "relu", "conv4", (8, 8, 8), 0),  # x.relu_()
    ("relu_ip", "relu", "bn", (8, 8, 8), 0),  # nn.ReLU(inplace=True) after BatchNorm
    ("relu6", "relu6", "conv6", (8, 8, 8), 0),
    ("clamp()", "clamp", "pos_fc", (8, 8, 6), 2),
    ("relu()#2", "relu", "conv1d", (12, 48), 0),
    ("relu()#3", "relu", "fc1", (32,), 0),
    ("leaky", "leaky_relu", "fc_leaky", (16,), 0),
    ("leaky_relu()", "leaky_relu", "fc_fleaky", (16,), 0),
    ("gelu", "gelu", "fc_gelu", (16,), 0),
    ("silu", "silu", "fc_silu", (16,), 0),
    ("elu", "elu", "fc_elu", (16,), 0),
    ("prelu", "prelu", "fc_prelu", (16,), 0),
    ("hardswish", "hardswish", "fc_hswish", (16,), 0),
    ("mish", "mish", "fc_mish", (16,), 0),
]
SITE_NAMES = [s[0] for s in SITES]
HARD_ZERO_OPS = {"relu", "relu6", "clamp"}

# What the test plants. act#1 and leaky_relu() get nothing: sites with no dead units.
PLANTED_DEAD = {
    "act#0": [1], "relu()#0": [5], "block.relu()": [0, 6], "relu()#1": [7], "relu_ip": [3], "relu6": [2],
    "clamp()": [4], "relu()#2": [9], "relu()#3": [10], "leaky": [0], "gelu": [2], "silu": [3], "elu": [4],
    "prelu": [5], "hardswish": [6], "mish": [7],
}
PLANTED_RARE = {"relu()#3": [20]}  # active on exactly 1 of the 200 samples
PLANTED_DORMANT = {"gelu": [5], "silu": [6]}  # always active, but tiny outputs


def _relu(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t, torch.zeros_like(t))


def reference(m: Zoo, x: torch.Tensor, batch: int = BATCH) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                    torch.Tensor]:
    """Zoo.forward recomputed with hand-written activations: {site: (activation input, output)}, logits.

    The layers that produce the pre-activations are the model's own modules, run on the same
    batches as the analysis: a matmul's rounding depends on the batch size, and an element a
    rounding step away from 0 would otherwise land on the other side of it.
    """
    parts = [_reference_batch(m, x[start:start + batch]) for start in range(0, len(x), batch)]
    sites = {name: (torch.cat([p[0][name][0] for p in parts]), torch.cat([p[0][name][1] for p in parts]))
             for name in parts[0][0]}
    return sites, torch.cat([p[1] for p in parts])


def _reference_batch(m: Zoo, x: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def site(name: str, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        sites[name] = (pre, out)
        return out

    with torch.no_grad():
        p = m.conv1(x)
        h = site("act#0", p, _relu(p))
        p = m.conv2(h)
        h = site("relu()#0", p, _relu(p))
        p = m.block.conv(h)
        h = site("block.relu()", p, _relu(p))
        p = m.conv3(h)
        h = site("act#1", p, _relu(p))
        p = m.conv4(h)
        h = site("relu()#1", p, _relu(p))
        p = m.bn(m.conv5(h))
        h = site("relu_ip", p, _relu(p))
        p = m.conv6(h)
        h = site("relu6", p, torch.minimum(_relu(p), torch.tensor(6.0)))
        p = m.pos_fc(h)
        h = site("clamp()", p, _relu(p))
        p = m.conv1d(h.reshape(h.shape[0], 8, 48))
        h = site("relu()#2", p, _relu(p))
        p = m.fc1(h.reshape(h.shape[0], -1))
        z = site("relu()#3", p, _relu(p))

        p = m.fc_leaky(z)
        total = site("leaky", p, torch.where(p > 0, p, 0.1 * p))
        p = m.fc_fleaky(z)
        total = total + site("leaky_relu()", p, torch.where(p > 0, p, 0.2 * p))
        p = m.fc_gelu(z)
        total = total + site("gelu", p, 0.5 * p * (1.0 + torch.erf(p / math.sqrt(2.0))))
        p = m.fc_silu(z)
        total = total + site("silu", p, p / (1.0 + torch.exp(-p)))
        p = m.fc_elu(z)
        total = total + site("elu", p, torch.where(p > 0, p, torch.expm1(p)))
        p = m.fc_prelu(z)
        total = total + site("prelu", p, torch.where(p > 0, p, m.prelu.weight[None, :] * p))
        p = m.fc_hswish(z)
        total = total + site("hardswish", p, p * torch.clamp(p + 3.0, 0.0, 6.0) / 6.0)
        p = m.fc_mish(z)
        total = total + site("mish", p, p * torch.tanh(torch.log1p(torch.exp(p))))
        logits = m.head(total)
    return sites, logits


def _batch_unit_dim(name: str) -> int:
    _, _, _, shape, axis = SITES[SITE_NAMES.index(name)]
    return axis + 1


def _per_unit(t: torch.Tensor, dim: int) -> np.ndarray:
    """[units, everything else] as float64 numpy."""
    return np.moveaxis(t.detach().double().numpy(), dim, 0).reshape(t.shape[dim], -1)


def calibration_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N_SAMPLES, 3, 8, 8, generator=g)


def build_zoo() -> Zoo:
    """A Zoo whose units are all alive and well-used, except the planted ones.

    Layer by layer in forward order: each unit's bias is set to minus the median of its
    pre-activation over the calibration data (so about half of its elements are active), then
    the planted units are set: bias -1e4 (dead), a bias that lets only the largest sample
    through (rarely active), or zero weights and a tiny positive bias (dormant).
    """
    torch.manual_seed(0)
    m = Zoo().eval()
    for module in m.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    with torch.no_grad():
        m.conv6.weight.mul_(40.0)  # large outputs: a good share of ReLU6 outputs saturate at 6
        m.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        m.bn.running_var.copy_(torch.linspace(0.5, 2.0, 8))
        m.bn.weight.copy_(torch.linspace(0.5, 1.5, 8))
        m.prelu.weight.copy_(torch.linspace(0.05, 0.4, 16))
        x = calibration_inputs()
        for name, _, producer, _, _ in SITES:
            layer = m.get_submodule(producer)
            dim = _batch_unit_dim(name)
            if name in PLANTED_DORMANT:
                for unit in PLANTED_DORMANT[name]:
                    layer.weight[unit].zero_()
            pre = reference(m, x)[0][name][0]
            layer.bias -= torch.from_numpy(np.median(_per_unit(pre, dim), axis=1)).float()
            for unit in PLANTED_DORMANT.get(name, []):
                layer.bias[unit] = 1e-3
            for unit in PLANTED_RARE.get(name, []):
                values = np.sort(_per_unit(reference(m, x)[0][name][0], dim)[unit])
                assert values[-1] > values[-2]
                layer.bias[unit] -= float((values[-1] + values[-2]) / 2)
            for unit in PLANTED_DEAD.get(name, []):
                layer.bias[unit] = DEAD_BIAS
    return m


def expected_site(name: str, pre: torch.Tensor, out: torch.Tensor, rare: float = RARE,
                  tau: float = TAU) -> dict[str, Any]:
    """A report entry computed from the README's definitions with numpy (float64)."""
    _, op, _, shape, axis = SITES[SITE_NAMES.index(name)]
    dim = axis + 1
    y = out.detach().double().numpy()
    active = (_per_unit(out, dim) > 0) if op in HARD_ZERO_OPS else (_per_unit(pre, dim) > 0)
    counts = active.sum(axis=1)
    per_unit = active.shape[1]
    unit_mean_abs = np.abs(_per_unit(out, dim)).mean(axis=1)
    dormant = [] if op in HARD_ZERO_OPS else \
        [int(u) for u in np.flatnonzero(unit_mean_abs <= tau * unit_mean_abs.mean())]
    return {
        "op": op,
        "shape": list(shape),
        "unit_axis": axis,
        "units": shape[axis],
        "samples": int(out.shape[0]),
        "zero_fraction": 1.0 - counts.sum() / active.size,
        "dead_units": [int(u) for u in np.flatnonzero(counts == 0)],
        "rarely_active_units": [int(u) for u in np.flatnonzero((counts > 0) & (counts / per_unit < rare))],
        "dormant_units": dormant,
        "min": float(y.min()),
        "max": float(y.max()),
        "mean": float(y.mean()),
        "std": float(y.std()),
        "saturated_fraction": float((y >= 6.0).mean()) if op == "relu6" else None,
    }


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return build_zoo()


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return calibration_inputs()


@pytest.fixture(scope="module")
def expected(zoo: Zoo, data: torch.Tensor) -> dict[str, dict[str, Any]]:
    sites, logits = reference(zoo, data)
    with torch.no_grad():
        actual = zoo(data.clone())
    torch.testing.assert_close(logits, actual, rtol=1e-4, atol=1e-3)  # the reference is the model
    return {name: expected_site(name, pre, out) for name, (pre, out) in sites.items()}


@pytest.fixture(scope="module")
def eager_report(zoo: Zoo, data: torch.Tensor) -> reluscope.Report:
    return reluscope.analyze(zoo, data, batch_size=BATCH, rare_threshold=RARE, dormant_tau=TAU)


@pytest.fixture(scope="module")
def zoo_files(zoo: Zoo, data: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo saved as a state_dict (+ --arch file), a whole pickled module, .pt2 and TorchScript."""
    folder = tmp_path_factory.mktemp("zoo")
    arch = folder / "zoo_arch.py"
    arch.write_text("import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"
                    + inspect.getsource(Block) + "\n\n" + inspect.getsource(Zoo)
                    + "\n\ndef zoo():\n    return Zoo()\n")
    files = {"arch": arch, "state_dict": folder / "zoo.pt", "pickle": folder / "zoo_module.pt",
             "export": folder / "zoo.pt2", "torchscript": folder / "zoo.torchscript"}
    torch.save(zoo.state_dict(), files["state_dict"])
    torch.save(zoo, files["pickle"])
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(zoo, (data[:2].clone(),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, files["export"])
    torch.jit.save(torch.jit.script(zoo), files["torchscript"])
    return files


# ----------------------------------------------------------------------------- the zoo itself
def test_planted_units_are_exactly_what_the_reference_computes(expected: dict[str, dict[str, Any]]) -> None:
    """Guards the test's premise: dead/rare/dormant units are the planted ones and no others."""
    for name in SITE_NAMES:
        assert expected[name]["dead_units"] == PLANTED_DEAD.get(name, []), name
        assert expected[name]["rarely_active_units"] == PLANTED_RARE.get(name, []), name
    for name, units in PLANTED_DORMANT.items():
        # a dead GELU/SiLU unit outputs ~0, so it is dormant as well
        assert expected[name]["dormant_units"] == sorted(units + PLANTED_DEAD[name]), name
    assert 0.05 < expected["relu6"]["saturated_fraction"] < 0.5


# ----------------------------------------------------------------------------- eager analysis
def test_site_names_ops_and_order_of_first_call(eager_report: reluscope.Report) -> None:
    assert eager_report.names == SITE_NAMES
    assert [layer["op"] for layer in eager_report.layers] == [s[1] for s in SITES]
    assert eager_report.unanalysed == []


def test_unit_axis_shape_and_units(eager_report: reluscope.Report) -> None:
    for name, _, _, shape, axis in SITES:
        layer = eager_report.layer(name)
        assert (tuple(layer["shape"]), layer["unit_axis"], layer["units"]) == (shape, axis, shape[axis]), name


@pytest.mark.parametrize("name", SITE_NAMES)
def test_site_matches_independent_computation(eager_report: reluscope.Report, expected: dict[str, dict[str, Any]],
                                              name: str) -> None:
    got, want = eager_report.layer(name), expected[name]
    for key in ("op", "shape", "unit_axis", "units", "samples", "dead_units", "rarely_active_units",
                "dormant_units"):
        assert got[key] == want[key], key
    assert got["zero_fraction"] == pytest.approx(want["zero_fraction"], rel=0, abs=1e-12)
    assert got["dead_fraction"] == pytest.approx(len(want["dead_units"]) / want["units"], abs=1e-12)
    for key in ("min", "max", "mean", "std"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    if want["saturated_fraction"] is None:
        assert got.get("saturated_fraction") is None
    else:
        assert got["saturated_fraction"] == pytest.approx(want["saturated_fraction"], abs=1e-12)
    assert got["nonfinite"] == 0


def test_summary_adds_up(eager_report: reluscope.Report, expected: dict[str, dict[str, Any]]) -> None:
    summary = eager_report.summary
    assert summary["layers"] == len(SITES)
    assert summary["units"] == sum(e["units"] for e in expected.values())
    assert summary["dead_units"] == sum(len(units) for units in PLANTED_DEAD.values())
    assert summary["dead_fraction"] == pytest.approx(summary["dead_units"] / summary["units"])
    assert summary["mean_zero_fraction"] == pytest.approx(
        np.mean([e["zero_fraction"] for e in expected.values()]), abs=1e-12)


@pytest.mark.parametrize(("rare", "tau"), [(0.004, 0.0), (0.02, 0.3)])
def test_thresholds_are_applied(zoo: Zoo, data: torch.Tensor, rare: float, tau: float) -> None:
    """At 0.004 the planted rare unit (active share 1/200) is no longer rarely active."""
    report = reluscope.analyze(zoo, data, batch_size=BATCH, rare_threshold=rare, dormant_tau=tau)
    sites, _ = reference(zoo, data)
    for name, (pre, out) in sites.items():
        want = expected_site(name, pre, out, rare=rare, tau=tau)
        got = report.layer(name)
        assert (got["rarely_active_units"], got["dormant_units"]) == \
            (want["rarely_active_units"], want["dormant_units"]), name
    assert report.layer("relu()#3")["rarely_active_units"] == ([] if rare < 0.005 else PLANTED_RARE["relu()#3"])


def test_batch_size_does_not_change_the_numbers(zoo: Zoo, data: torch.Tensor,
                                                eager_report: reluscope.Report) -> None:
    other = reluscope.analyze(zoo, data, batch_size=7)
    for a, b in zip(eager_report.layers, other.layers):
        assert (a["name"], a["zero_fraction"], a["dead_units"], a["rarely_active_units"]) == \
            (b["name"], b["zero_fraction"], b["dead_units"], b["rarely_active_units"])
        for key in ("min", "max", "mean", "std"):  # GEMM blocking changes with the batch: last-bit differences
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["name"], key)


def test_unit_axis_override(zoo: Zoo, data: torch.Tensor, expected: dict[str, dict[str, Any]]) -> None:
    """--unit-axis -1 counts units on the last axis everywhere: the clamp() site is unchanged,
    conv sites now count their 8 columns (never dead: the planted channel is one of 8 rows)."""
    report = reluscope.analyze(zoo, data, batch_size=BATCH, unit_axis=-1)
    clamp = report.layer("clamp()")
    assert (clamp["unit_axis"], clamp["dead_units"]) == (2, expected["clamp()"]["dead_units"])
    conv = report.layer("act#0")
    assert (conv["unit_axis"], conv["units"], conv["dead_units"]) == (2, 8, [])
    assert conv["zero_fraction"] == pytest.approx(expected["act#0"]["zero_fraction"], abs=1e-12)


# ----------------------------------------------------------------------------- every format
FORMAT_KINDS = {"state_dict": "torch-state-dict", "pickle": "torch-pickle", "export": "torch-export",
                "torchscript": "torchscript"}


@pytest.mark.parametrize("kind", list(FORMAT_KINDS))
def test_formats_give_the_same_sites(kind: str, zoo_files: dict[str, Path], data: torch.Tensor,
                                     eager_report: reluscope.Report) -> None:
    options: dict[str, Any] = {}
    if kind == "state_dict":
        options["arch"] = f"{zoo_files['arch']}:zoo"
    if kind in ("pickle", "torchscript"):  # code, not data: only when trusted
        options["trust_checkpoint"] = True
    report = reluscope.analyze(zoo_files[kind], data, batch_size=BATCH, **options)
    assert report.model["format"] == FORMAT_KINDS[kind]
    assert report.unanalysed == []
    assert report.names == eager_report.names
    for got, want in zip(report.layers, eager_report.layers):
        for key in ("op", "shape", "unit_axis", "units", "zero_fraction", "dead_units", "rarely_active_units",
                    "dormant_units", "nonfinite", "saturated_fraction"):
            assert got[key] == want[key], (got["name"], key)
        for key in ("min", "max", "mean", "std"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["name"], key)


def test_torchscript_sites_inside_control_flow_are_reported_unanalysed(tmp_path: Path) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.fc(x))
            if x.sum() > 0:
                y = torch.relu(y - 1.0)
            return y

    path = tmp_path / "branchy.torchscript"
    torch.jit.save(torch.jit.script(Branchy()), path)
    report = reluscope.analyze(path, torch.randn(8, 4), trust_checkpoint=True)
    assert report.names == ["act"]
    assert [item["name"] for item in report.unanalysed] == ["relu()"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, test_cpu_and_cuda_agree runs the kernel compiled")
def test_triton_kernel_gives_the_pytorch_report(zoo: Zoo, data: torch.Tensor, eager_report: reluscope.Report) -> None:
    """The whole zoo through the one-pass kernel (Triton's interpreter, see conftest.py): PReLU
    falls back to PyTorch, everything else goes through the kernel; the numbers are the same."""
    pytest.importorskip("triton")
    report = reluscope.analyze(zoo, data, batch_size=BATCH, stats_kernel="triton", percentiles=True)
    plain = reluscope.analyze(zoo, data, batch_size=BATCH, stats_kernel="torch", percentiles=True)
    assert report.run["stats_kernel"] == "triton" and plain.run["stats_kernel"] == "torch"
    assert report.names == plain.names == eager_report.names
    for got, want in zip(report.layers, plain.layers):
        for key, value in want.items():
            if key in ("mean", "std"):  # float64 sums in the kernel, float32 in the PyTorch route
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (want["name"], key)
            else:
                assert got[key] == value, (want["name"], key)
    assert report.summary == plain.summary


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_agree(zoo: Zoo, data: torch.Tensor, eager_report: reluscope.Report) -> None:
    report = reluscope.analyze(zoo, data, batch_size=BATCH, device="cuda")
    assert report.run["device"].startswith("cuda")
    assert next(zoo.parameters()).device.type == "cpu"  # handed back where it was
    assert report.names == eager_report.names
    for got, want in zip(report.layers, eager_report.layers):
        for key in ("op", "shape", "unit_axis", "dead_units", "rarely_active_units"):
            assert got[key] == want[key], (got["name"], key)
        # cuDNN convolutions round differently: an element near 0 may change sides
        assert got["zero_fraction"] == pytest.approx(want["zero_fraction"], abs=1e-4), got["name"]
        for key in ("min", "max", "mean", "std"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4), (got["name"], key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_on_cuda_tensor_data(zoo: Zoo, data: torch.Tensor, eager_report: reluscope.Report) -> None:
    model = build_zoo().cuda()
    report = reluscope.analyze(model, data.cuda(), batch_size=BATCH)  # device auto follows the model
    assert report.run["device"].startswith("cuda")
    assert next(model.parameters()).is_cuda
    assert [layer["dead_units"] for layer in report.layers] == [layer["dead_units"] for layer in eager_report.layers]


# ----------------------------------------------------------------------------- later in-place writes
class Overwrites(nn.Module):
    """Writes over its activation outputs in place right after they are produced."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.fc(x))
        y.sub_(1000.0)  # a kept reference to y would now read -1000 everywhere
        z = self.act(y + 1000.0)
        z.mul_(0.0)
        return z


@pytest.mark.parametrize("kind", ["eager", "torchscript", "export"])
def test_statistics_are_taken_before_later_in_place_writes(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Overwrites().eval()
    x = torch.randn(40, 5)
    with torch.no_grad():
        y = torch.relu(model.fc(x))
        expected = {"relu()": y, "act": torch.relu((y - 1000.0) + 1000.0)}  # what each site really outputs
    target: Any = model
    if kind == "torchscript":
        target = tmp_path / "m.torchscript"
        torch.jit.save(torch.jit.script(model), target)
    elif kind == "export":
        target = tmp_path / "m.pt2"
        torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes={"x": {0: torch.export.Dim("b")}}),
                          target)
    report = reluscope.analyze(target, x, batch_size=16, trust_checkpoint=kind == "torchscript")
    assert report.names == ["relu()", "act"]
    for layer in report.layers:
        out = expected[layer["name"]]
        assert layer["min"] == 0.0
        assert layer["max"] == pytest.approx(out.max().item(), rel=1e-6)
        assert layer["zero_fraction"] == pytest.approx((out <= 0).double().mean().item(), abs=1e-12)
        assert layer["dead_units"] == torch.nonzero(out.amax(0) <= 0).flatten().tolist()
