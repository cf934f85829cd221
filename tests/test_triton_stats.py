"""The one-pass Triton statistics kernel gives the numbers of the plain PyTorch route.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): the
same kernel source, executed with numpy, so indexing, masking, the tile/split arithmetic and
the atomics are checked here too. With a GPU the compiled kernel runs on CUDA tensors instead.
Counts (active per unit, saturated, NaN/Inf), min and max must be identical; sums agree to
float64 rounding with the NaN-safe PyTorch route, which also sums in float64.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import arch_spec
from typer.testing import CliRunner

from reluscope.cli import app
from reluscope.measure.sites import Activation
from reluscope.measure.reductions import NonfinitePolicy, TorchReduction
from reluscope.measure.stats import SiteStats

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module")
def kernel() -> ModuleType:
    """reluscope.triton_stats: compiled for the GPU, or interpreted (conftest.py sets
    TRITON_INTERPRET=1 before anything imports triton when there is no GPU)."""
    import reluscope.backends.torch.triton_kernel

    assert CUDA or reluscope.backends.torch.triton_kernel.INTERPRETED
    return reluscope.backends.torch.triton_kernel


RELU = Activation("relu", hard_zero=True)
RELU6 = Activation("relu6", hard_zero=True, upper=6.0)
HARDSIGMOID = Activation("hardsigmoid", hard_zero=True, upper=1.0)
GELU = Activation("gelu", hard_zero=False)
LEAKY = Activation("leaky_relu", hard_zero=False)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poisoned(y: torch.Tensor) -> torch.Tensor:
    flat = y.view(-1)  # NaN, +Inf and -Inf in places that fall in different units and tiles
    flat[3] = float("nan")
    flat[flat.numel() // 2] = float("inf")
    flat[-1] = float("-inf")
    return y


def _dead_channels(y: torch.Tensor) -> torch.Tensor:
    y[:, ::3] = 0.0  # every third unit never fires
    return y


# name -> (activation, batch maker, unit axis of a sample)
CASES: dict[str, tuple[Activation, Callable[[], torch.Tensor], int]] = {
    "conv 7x7 map": (RELU, lambda: torch.randn(6, 12, 7, 7, generator=_seeded(1)).relu(), 0),
    "conv map wider than a tile": (RELU, lambda: torch.randn(2, 3, 40, 41, generator=_seeded(2)).relu(), 0),
    "conv 2x2 map, many units": (RELU, lambda: torch.randn(5, 70, 2, 2, generator=_seeded(3)).relu(), 0),
    "channels_last": (RELU, lambda: torch.randn(3, 24, 5, 6, generator=_seeded(4)).relu()
                      .contiguous(memory_format=torch.channels_last), 0),
    "linear, few units": (RELU, lambda: torch.randn(37, 10, generator=_seeded(5)).relu(), 0),
    "linear, more units than a block": (RELU, lambda: torch.randn(9, 300, generator=_seeded(6)).relu(), 0),
    "tokens, units last": (GELU, lambda: F.gelu(torch.randn(4, 11, 20, generator=_seeded(7))), 1),
    "relu6 saturates": (RELU6, lambda: (4 * torch.randn(8, 5, 30, generator=_seeded(8))).clamp(0, 6), 0),
    "hardsigmoid": (HARDSIGMOID, lambda: F.hardsigmoid(3 * torch.randn(16, 7, generator=_seeded(9))), 0),
    "leaky relu, negative outputs": (LEAKY, lambda: F.leaky_relu(torch.randn(10, 6, 3, generator=_seeded(10))), 0),
    "dead units": (RELU, lambda: _dead_channels(torch.randn(4, 9, 3, 3, generator=_seeded(11)).relu()), 0),
    "NaN and Inf": (RELU, lambda: _poisoned(torch.randn(5, 8, 4, 4, generator=_seeded(12)).relu()), 0),
    "NaN and Inf, gelu": (GELU, lambda: _poisoned(F.gelu(torch.randn(6, 13, generator=_seeded(13)))), 0),
    "float16": (RELU, lambda: torch.randn(7, 6, 5, 5, generator=_seeded(14)).relu().half(), 0),
    "bfloat16": (GELU, lambda: F.gelu(torch.randn(7, 33, generator=_seeded(15))).bfloat16(), 0),
    "all zero": (RELU, lambda: torch.zeros(3, 4, 2, 2), 0),
    "one sample, one unit": (RELU, lambda: torch.tensor([[0.5]]), 0),
}


def _pair(activation: Activation, shape: tuple[int, ...], axis: int) -> tuple[SiteStats, SiteStats]:
    # The reference takes the NaN-safe PyTorch route, which sums in float64 as the kernel does.
    reference = SiteStats(activation, shape, axis, DEVICE, reduction=TorchReduction(NonfinitePolicy.MASKED))
    fused = SiteStats(activation, shape, axis, DEVICE)  # accumulators only; filled below
    return reference, fused


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("elements", "samples", "active", "saturated", "nonfinite", "min", "max"):
        assert got[key] == want[key], key
    for key in ("sum", "sumsq"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    if want["abs_sum"] is None:
        assert got["abs_sum"] is None
    else:
        assert got["abs_sum"] == pytest.approx(want["abs_sum"], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("programs", [1, 3, 64], ids=lambda p: f"{p} programs")
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_pytorch_route(kernel: ModuleType, case: str, programs: int) -> None:
    activation, make, axis = CASES[case]
    batches = [make().to(DEVICE) for _ in range(2)]
    batches[1] = batches[1].flip(0).contiguous(memory_format=torch.channels_last) \
        if batches[1].dim() == 4 and case == "channels_last" else batches[1].flip(0)
    shape = tuple(batches[0].shape[1:])
    reference, fused = _pair(activation, shape, axis)
    unit_dim = axis + 1
    for y in batches:
        reference.update(y)
        fused.samples += y.shape[0]
        fused.elements += y.numel()
        assert kernel.accumulate(fused, y, unit_dim, target_programs=programs), "layout should be supported"
    _assert_same(fused.to_host(), reference.to_host())


def test_kernel_matches_the_fast_pytorch_route_on_counts(kernel: ModuleType) -> None:
    """The fast route (float32 sums) is what the CPU and the torch kernel use on finite batches."""
    y = torch.randn(16, 32, 14, 14, generator=_seeded(20)).relu().to(DEVICE)
    fast = SiteStats(RELU, tuple(y.shape[1:]), 0, DEVICE, reduction=TorchReduction(NonfinitePolicy.CHECK))
    fast.update(y)
    fused = SiteStats(RELU, tuple(y.shape[1:]), 0, DEVICE)
    fused.samples, fused.elements = y.shape[0], y.numel()
    assert kernel.accumulate(fused, y, 1)
    got, want = fused.to_host(), fast.to_host()
    for key in ("active", "nonfinite", "min", "max"):
        assert got[key] == want[key], key
    exact = y.double()
    assert got["sum"] == pytest.approx(exact.sum().item(), rel=1e-12)  # the kernel sums in float64
    assert got["sumsq"] == pytest.approx((exact * exact).sum().item(), rel=1e-12)
    assert want["sum"] == pytest.approx(got["sum"], rel=1e-6)  # float32 sums, rounded


def test_scalar_sites_have_one_unit(kernel: ModuleType) -> None:
    y = torch.tensor([0.0, 2.0, -0.0, 3.5, 0.0], device=DEVICE)  # one scalar per sample
    reference = SiteStats(RELU, (), 0, DEVICE, reduction=TorchReduction(NonfinitePolicy.MASKED))
    reference.update(y)
    fused = SiteStats(RELU, (), 0, DEVICE)
    fused.samples, fused.elements = 5, 5
    assert kernel.accumulate(fused, y, None)
    _assert_same(fused.to_host(), reference.to_host())
    assert fused.to_host()["active"] == [2]


@pytest.mark.parametrize("why, y, unit_dim", [
    ("float64 keeps its own precision", torch.ones(4, 3, dtype=torch.float64), 1),
    ("integers are not activations", torch.ones(4, 3, dtype=torch.int32), 1),
    ("a transposed view is neither layout", torch.ones(3, 4, 5).transpose(0, 2), 1),
    ("nothing to read", torch.ones(0, 3), 1),
])
def test_unsupported_inputs_are_left_to_pytorch(kernel: ModuleType, why: str, y: torch.Tensor,
                                                unit_dim: int) -> None:
    stats = SiteStats(RELU, tuple(y.shape[1:]), unit_dim - 1, DEVICE)
    assert kernel.accumulate(stats, y.to(DEVICE), unit_dim) is False, why
    assert stats.to_host()["active"] == [0] * stats.units  # untouched


def test_tiles_cover_the_unit_and_inner_extent(kernel: ModuleType) -> None:
    for units, inner in [(1, 1), (10, 1), (300, 1), (64, 49), (2048, 49), (64, 3136), (256, 196), (3, 1)]:
        rows, unit_block, inner_block = kernel.tile_shape(units, inner)
        assert rows * unit_block * inner_block == kernel.TILE
        assert min(rows, unit_block, inner_block) >= 1
        # a tile row spans >= MIN_SPAN contiguous elements where the tensor has them
        assert unit_block * inner_block >= min(kernel.MIN_SPAN, units * inner) or unit_block >= units


def test_kernel_compiles_for_the_h100_without_spilling(cli_env: dict[str, str]) -> None:
    """The interpreter accepts things the GPU compiler may not: compile every tile variant to an
    sm_90 cubin (Triton ships ptxas) and read its resource use."""
    env = {k: v for k, v in cli_env.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_aot.py")), "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    variants = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(variants) == 6
    for variant in variants:
        assert variant["spill_bytes"] == 0, variant
        assert variant["registers"] <= 255, variant
        assert variant["atomics"] >= 6, variant  # the accumulators are updated in the kernel itself
    # aligned rows load 16 bytes at a time: a 56x56 map, and 512 units on the last axis
    for aligned in (next(v for v in variants if v["inner"] == 3136), next(v for v in variants if v["units"] == 512)):
        assert aligned["vector_loads"] > 0, aligned


def test_self_check_passes_on_this_machine(kernel: ModuleType) -> None:
    kernel.self_check.cache_clear()
    assert kernel.self_check(DEVICE) is None


@pytest.fixture
def broken_kernel(kernel: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[..., bool]], None]:
    """Fault injection: replace the launch (as a GPU the kernel cannot compile for, or a compiler
    that miscompiles it, would) for the self-check and the analysis."""
    def install(fake: Callable[..., bool]) -> None:
        monkeypatch.setattr(kernel, "accumulate", fake)
        kernel.self_check.cache_clear()

    yield install
    kernel.self_check.cache_clear()


def _launch_fails(stats: SiteStats, y: torch.Tensor, unit_dim: int | None, **_: Any) -> bool:
    raise RuntimeError("PTX assembly aborted due to errors\nptxas fatal")


def test_a_kernel_that_cannot_run_is_refused_when_asked_for(broken_kernel: Callable, samples_dir: Path,
                                                            calib_path: Path, tmp_path: Path) -> None:
    broken_kernel(_launch_fails)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["analyze", str(samples_dir / "digits_cnn.pt"), "--arch", arch_spec("digits_cnn"),
                                      "--data", str(calib_path), "--device", str(DEVICE), "--stats-kernel", "triton",
                                      "-o", str(out), "-f", "json"])
    assert result.exit_code == 2
    assert (f"error: --stats-kernel triton: the Triton statistics kernel failed on {DEVICE}: RuntimeError: PTX "
            "assembly aborted due to errors; use --stats-kernel torch") in " ".join(result.output.split())
    assert not out.exists()


def test_a_kernel_that_miscounts_is_caught_by_the_self_check(broken_kernel: Callable, kernel: ModuleType) -> None:
    real = kernel.accumulate

    def off_by_one(stats: SiteStats, y: torch.Tensor, unit_dim: int | None, **options: Any) -> bool:
        done = real(stats, y, unit_dim, **options)
        stats.active[0] += 1
        return done

    broken_kernel(off_by_one)
    assert kernel.self_check(DEVICE) == f"the Triton statistics kernel disagreed with PyTorch on {DEVICE} (active)"


@pytest.mark.skipif(not CUDA, reason="auto tries the kernel only on CUDA")
def test_auto_falls_back_to_pytorch_with_a_warning(broken_kernel: Callable, samples_dir: Path,
                                                   calib_path: Path) -> None:
    import reluscope

    broken_kernel(_launch_fails)
    report = reluscope.analyze(samples_dir / "digits_cnn.pt", calib_path, arch=arch_spec("digits_cnn"),
                               device="cuda")
    assert report.run["stats_kernel"] == "torch"
    assert any("the Triton statistics kernel failed on cuda" in warning and "computed with PyTorch instead" in warning
               for warning in report.warnings)


# ----------------------------------------------------------------------------- through the CLI
def _analyze(samples_dir: Path, calib_path: Path, out: Path, kernel_choice: str, env: dict[str, str]
             ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reluscope", "analyze", str(samples_dir / "digits_cnn.pt"),
         "--arch", arch_spec("digits_cnn"), "--data", str(calib_path), "--stats-kernel", kernel_choice,
         "--device", str(DEVICE), "-f", "json", "-o", str(out), "-q"],
        capture_output=True, text=True, env=env, timeout=300)


def test_cli_reports_are_the_same_with_either_kernel(samples_dir: Path, calib_path: Path, tmp_path: Path,
                                                     cli_env: dict[str, str]) -> None:
    env = dict(cli_env)  # TRITON_INTERPRET=1 without a GPU (conftest.py)
    for choice in ("triton", "torch"):
        proc = _analyze(samples_dir, calib_path, tmp_path / f"{choice}.json", choice, env)
        assert proc.returncode == 0, proc.stderr
    fused = json.loads((tmp_path / "triton.json").read_text())
    plain = json.loads((tmp_path / "torch.json").read_text())
    assert fused["run"]["stats_kernel"] == "triton" and plain["run"]["stats_kernel"] == "torch"
    assert fused["summary"] == plain["summary"]
    assert len(fused["layers"]) == len(plain["layers"]) == 3
    for got, want in zip(fused["layers"], plain["layers"]):
        for key in want:
            if key in ("mean", "std"):  # the torch route's float32 sums round differently
                assert got[key] == pytest.approx(want[key], rel=1e-5), (want["name"], key)
            else:
                assert got[key] == want[key], (want["name"], key)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_asking_for_triton_without_a_gpu_is_a_usage_error(samples_dir: Path, calib_path: Path, tmp_path: Path,
                                                          cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = _analyze(samples_dir, calib_path, out, "triton", env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --stats-kernel triton: the Triton statistics kernel cannot run here: "
                                   "it needs a CUDA device, not cpu; use --stats-kernel auto or torch")
    assert not out.exists()


def test_an_unknown_kernel_is_a_usage_error(samples_dir: Path, calib_path: Path) -> None:
    result = CliRunner().invoke(app, ["analyze", str(samples_dir / "digits_mlp.pt"), "--arch",
                                      arch_spec("digits_mlp"), "--data", str(calib_path), "--stats-kernel", "cuda"])
    assert result.exit_code == 2
    assert "--stats-kernel 'cuda' must be auto, triton or torch" in result.output


def test_auto_takes_pytorch_on_the_cpu(samples_dir: Path, calib_path: Path) -> None:
    result = CliRunner().invoke(app, ["analyze", str(samples_dir / "digits_mlp.pt"), "--arch",
                                      arch_spec("digits_mlp"), "--data", str(calib_path), "--device", "cpu",
                                      "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"]["stats_kernel"] == "torch"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_takes_triton_on_cuda(samples_dir: Path, calib_path: Path) -> None:
    import reluscope

    report = reluscope.analyze(samples_dir / "digits_cnn.pt", calib_path, arch=arch_spec("digits_cnn"),
                               device="cuda")
    assert report.run["stats_kernel"] == "triton"
