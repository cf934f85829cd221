"""`reluscope prune` on PyTorch models, through the real CLI and the Python API: the bundled dead MLP in
every output format, and models built here from torch layers whose dead units are made by their
weights (a producer channel with zero weights and a negative bias never fires): BatchNorm after a
ReLU (bias folding, exact without padding, kept with padding), a residual block (coupling), a
depthwise convolution, a model with nothing dead, and a model whose outputs are random (the
verification fails: exit 1, no model written)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

import reluscope
from reluscope.cli import app

from conftest import CALIB, arch_spec

runner = CliRunner()

# Architectures of the models built in these tests, in a file --arch can name (the dead units come from
# the weights each test sets; `make_dead` is applied before the state_dict is saved).
ARCHITECTURES = textwrap.dedent('''
    import torch
    from torch import nn


    class FoldNet(nn.Module):
        """conv -> ReLU -> BatchNorm -> conv: BatchNorm turns a dead unit's 0 into a constant."""

        def __init__(self, padding=0):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3)
            self.relu1 = nn.ReLU()
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 6, 3, padding=padding)
            self.relu2 = nn.ReLU()
            self.head = nn.Linear(6 * (4 if padding == 0 else 6) ** 2, 10)

        def forward(self, x):
            x = self.bn(self.relu1(self.conv1(x)))
            return self.head(torch.flatten(self.relu2(self.conv2(x)), 1))


    class ResNetBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.relu0 = nn.ReLU()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 1)
            self.relu2 = nn.ReLU()
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            a = self.relu0(self.stem(x))
            b = self.relu1(self.conv1(a))
            c = self.relu2(self.conv2(b) + a)
            return self.head(c.mean((2, 3)))


    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.relu2 = nn.ReLU6()
            self.pw = nn.Conv2d(8, 4, 1)
            self.head = nn.Linear(4 * 64, 10)

        def forward(self, x):
            x = self.relu2(self.dw(self.relu1(self.conv(x))))
            return self.head(torch.flatten(self.pw(x), 1))


    class Branches(nn.Module):
        """Two branches concatenated along the channels, then one convolution reads both."""

        def __init__(self):
            super().__init__()
            self.left = nn.Conv2d(1, 4, 3)
            self.left_relu = nn.ReLU()
            self.right = nn.Conv2d(1, 6, 3)
            self.right_relu = nn.ReLU()
            self.mix = nn.Conv2d(10, 4, 1)
            self.head = nn.Linear(4 * 36, 10)

        def forward(self, x):
            both = torch.cat([self.left_relu(self.left(x)), self.right_relu(self.right(x))], 1)
            return self.head(torch.flatten(self.mix(both), 1))


    class Noisy(nn.Module):
        """Noise injected at inference (as MC dropout does): no two runs agree, so nothing can be verified."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 3)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(6, 4, 3)
            self.head = nn.Linear(4 * 16, 10)

        def forward(self, x):
            x = self.conv2(self.relu(self.conv1(x)))
            return self.head(torch.flatten(x + 0.01 * torch.randn_like(x), 1))


    class Healthy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 16)
            self.relu = nn.ReLU()
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.relu(self.fc1(torch.flatten(x, 1))))


    def fold_net():
        return FoldNet()


    def fold_net_padded():
        return FoldNet(padding=1)


    def resnet_block():
        return ResNetBlock()


    def depthwise():
        return Depthwise()


    def noisy():
        return Noisy()


    def branches():
        return Branches()


    def healthy():
        return Healthy()
''')


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def held_out_digits() -> np.ndarray:
    """The digits the sample models were trained on (the calibration set is the last 360)."""
    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    return images[:-360]


def calibration() -> np.ndarray:
    with np.load(CALIB) as archive:
        return archive["x"].copy()


def kill(conv_or_linear: torch.nn.Module, channels: list[int], bias: float = -100.0) -> None:
    """Make output `channels` of a layer constant at `bias` (dead after a ReLU when negative)."""
    with torch.no_grad():
        conv_or_linear.weight[channels] = 0.0
        conv_or_linear.bias[channels] = bias


def outputs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arch") / "prune_models.py"
    path.write_text(ARCHITECTURES)
    return path


def build(arch_file: Path, factory: str, folder: Path, setup: Any = None) -> tuple[torch.nn.Module, Path]:
    """The factory's model with `setup(model)` applied (seeded weights), saved as a state_dict in `folder`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"prune_models_{factory}", arch_file)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = getattr(module, factory)().eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):  # a trained BatchNorm: nothing maps 0 to 0
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
    if setup is not None:
        setup(model)
    path = folder / f"{factory}.pt"
    torch.save(model.state_dict(), path)
    return model, path


SCHEMA = json.loads(invoke("schema", "--prune").stdout)


def prune_json(model: Path, arch: str, *extra: Any) -> tuple[int, dict[str, Any]]:
    """`reluscope prune -f json`: its exit code and its report, which must fit `reluscope schema --prune`."""
    from jsonschema import Draft202012Validator

    result = invoke("prune", model, "--arch", arch, "--data", CALIB, "-f", "json", "-q", *extra)
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    Draft202012Validator(SCHEMA).validate(report)
    return result.exit_code, report


def sites(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {site["name"]: site for site in report["sites"]}


# ----------------------------------------------------------------------------- the bundled dead MLP
@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_the_dead_mlp_pruned_to_each_format_keeps_its_outputs(tmp_path: Path, samples_dir: Path,
                                                               suffix: str) -> None:
    target = tmp_path / f"small{suffix}"
    result = invoke("prune", samples_dir / "digits_mlp_dead.pt", "--arch", arch_spec("digits_mlp"), "--data", CALIB,
                    "-o", target, "-f", "json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    analysis = reluscope.analyze(samples_dir / "digits_mlp_dead.pt", CALIB, arch=arch_spec("digits_mlp"))
    dead = {layer["name"]: layer["dead_units"] for layer in analysis.layers}
    assert sum(map(len, dead.values())) > 64  # about half of the 192 units
    for name, site in sites(report).items():
        assert site["removed_units"] == dead[name] and site["kept_units"] == []
        assert site["units_after"] == site["units_before"] - len(dead[name])
    # parameters: fc1 loses rows (64 weights + a bias each), fc2 columns and rows, head columns
    d1, d2 = len(dead["act1"]), len(dead["act2"])
    expected = 17226 - (65 * d1 + 64 * d1 + (128 - d1) * d2 + d2 + 10 * d2)
    assert report["summary"]["parameters_after"] == expected
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= 1e-6
    assert report["output"] == {"path": str(target), "format": suffix, "written": True, "dry_run": False}

    original = torch.nn.Sequential()  # the original, as the sample's own architecture
    from reluscope.backends import load_model

    original = load_model(samples_dir / "digits_mlp_dead.pt", arch=arch_spec("digits_mlp")).module
    pruned = load_model(target, arch=arch_spec("digits_mlp")).module if suffix != ".onnx" else None
    for x in (calibration(), held_out_digits()):
        want = outputs(original, x)
        if suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: x})[0]
        else:
            got = outputs(pruned, x) if suffix == ".pt" else pruned(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


def test_a_pruned_state_dict_loads_only_into_its_architecture_and_is_analysed_without_dead_units(
        tmp_path: Path, samples_dir: Path) -> None:
    target = tmp_path / "small.pt"
    assert invoke("prune", samples_dir / "digits_mlp_dead.pt", "--arch", arch_spec("digits_mlp"), "--data", CALIB,
                  "-o", target, "-q").exit_code == 0
    analysed = reluscope.analyze(target, CALIB, arch=arch_spec("digits_mlp"))
    assert analysed.summary["dead_units"] == 0
    loaded = torch.load(target, weights_only=True)  # plain tensors: no code runs to read it
    assert set(loaded) == {"reluscope_pruned", "state_dict"}
    wrong = invoke("analyze", target, "--arch", arch_spec("digits_cnn"), "--data", CALIB)
    assert wrong.exit_code == 2 and "do not fit the --arch model" in wrong.output


# ----------------------------------------------------------------------------- exactness
def test_batchnorm_after_a_relu_is_folded_into_the_next_convolution(arch_file: Path, tmp_path: Path) -> None:
    model, path = build(arch_file, "fold_net", tmp_path, lambda m: kill(m.conv1, [1, 4]))
    code, report = prune_json(path, f"{arch_file}:fold_net", "-o", tmp_path / "folded.pt")
    assert code == 0
    relu1 = sites(report)["relu1"]
    assert relu1["removed_units"] == [1, 4] and relu1["units_after"] == 6
    assert report["verification"]["relative_diff"] <= 1e-6
    # BatchNorm maps the dead units' 0 to a nonzero constant: without the fold the outputs would move
    pruned = reluscope.prune(path, CALIB, arch=f"{arch_file}:fold_net")[0]
    assert pruned.conv2.in_channels == 6 and pruned.bn.num_features == 6
    x = calibration()
    np.testing.assert_allclose(outputs(pruned, x), outputs(model, x), atol=1e-5)


def test_a_constant_folded_into_a_padded_convolution_is_kept_with_the_reason(arch_file: Path,
                                                                              tmp_path: Path) -> None:
    _, path = build(arch_file, "fold_net_padded", tmp_path, lambda m: kill(m.conv1, [1, 4]))
    code, report = prune_json(path, f"{arch_file}:fold_net_padded", "--dry-run")
    assert code == 0
    relu1 = sites(report)["relu1"]
    assert relu1["removed_units"] == []
    assert {item["unit"] for item in relu1["kept_units"]} == {1, 4}
    assert all("zero-padded convolution conv2" in item["reason"] for item in relu1["kept_units"])
    assert report["verification"]["max_abs_diff"] == 0.0  # nothing applied, nothing changed


def test_a_residual_unit_goes_only_when_dead_at_every_coupled_site(arch_file: Path, tmp_path: Path) -> None:
    def setup(m: torch.nn.Module) -> None:
        kill(m.stem, [2, 5])  # dead at relu0 (the residual input)
        kill(m.conv2, [2], bias=-100.0)  # ... and after the add for 2: relu2 = relu(-100 + 0)
        kill(m.conv2, [5], bias=1.0)  # 5 is active after the add: relu2 = relu(1 + 0) = 1

    _, path = build(arch_file, "resnet_block", tmp_path, setup)
    code, report = prune_json(path, f"{arch_file}:resnet_block", "--dry-run")
    assert code == 0
    by_name = sites(report)
    assert by_name["relu0"]["removed_units"] == [2] and by_name["relu2"]["removed_units"] == [2]
    kept = {item["unit"]: item["reason"] for item in by_name["relu0"]["kept_units"]}
    assert kept == {5: "active at coupled site relu2"}
    assert report["verification"]["max_abs_diff"] <= 1e-6 * report["verification"]["output_scale"]


def test_a_unit_coupled_to_a_site_left_out_by_sites_stays(arch_file: Path, tmp_path: Path) -> None:
    def setup(m: torch.nn.Module) -> None:
        kill(m.stem, [2])
        kill(m.conv2, [2], bias=-100.0)  # dead at relu0 and relu2

    _, path = build(arch_file, "resnet_block", tmp_path, setup)
    _, everywhere = prune_json(path, f"{arch_file}:resnet_block", "--dry-run")
    assert sites(everywhere)["relu0"]["removed_units"] == [2]
    _, only_relu0 = prune_json(path, f"{arch_file}:resnet_block", "--dry-run", "--sites", "relu0")
    assert only_relu0["summary"]["removed_units"] == 0
    assert sites(only_relu0)["relu0"]["kept_units"] == [
        {"unit": 2, "reason": "coupled site relu2 is not pruned (not a hard-zero activation, or left out by --sites)"}]


def test_a_depthwise_convolution_couples_its_input_and_output_units(arch_file: Path, tmp_path: Path) -> None:
    def setup(m: torch.nn.Module) -> None:
        kill(m.conv, [3, 6])  # dead at relu1
        kill(m.dw, [3], bias=-1.0)  # the depthwise channel 3 stays dead at relu2
        kill(m.dw, [6], bias=0.5)  # channel 6 becomes a constant 0.5 at relu2: not dead there

    model, path = build(arch_file, "depthwise", tmp_path, setup)
    code, report = prune_json(path, f"{arch_file}:depthwise", "-o", tmp_path / "dw.pt2")
    assert code == 0
    by_name = sites(report)
    assert by_name["relu1"]["removed_units"] == [3] and by_name["relu2"]["removed_units"] == [3]
    assert by_name["relu1"]["kept_units"] == [{"unit": 6, "reason": "active at coupled site relu2"}]
    pruned = torch.export.load(tmp_path / "dw.pt2").module()
    x = calibration()
    np.testing.assert_allclose(pruned(torch.from_numpy(x)).detach().numpy(), outputs(model, x), atol=1e-5)


def test_concatenated_branches_lose_their_own_dead_units(arch_file: Path, tmp_path: Path) -> None:
    def setup(m: torch.nn.Module) -> None:
        kill(m.left, [1])
        kill(m.right, [0, 4])

    model, path = build(arch_file, "branches", tmp_path, setup)
    _, report = prune_json(path, f"{arch_file}:branches", "--dry-run")
    assert sites(report)["left_relu"]["removed_units"] == [1]
    assert sites(report)["right_relu"]["removed_units"] == [0, 4]
    pruned, _ = reluscope.prune(path, CALIB, arch=f"{arch_file}:branches")
    assert pruned.mix.in_channels == 7
    x = calibration()
    np.testing.assert_allclose(outputs(pruned, x), outputs(model, x), atol=1e-5)


def test_a_model_with_nothing_dead_is_left_unchanged_and_says_so(arch_file: Path, tmp_path: Path) -> None:
    def setup(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m.fc1.bias.fill_(50.0)  # every unit fires on every sample

    _, path = build(arch_file, "healthy", tmp_path, setup)
    result = invoke("prune", path, "--arch", f"{arch_file}:healthy", "--data", CALIB, "-o", tmp_path / "same.pt")
    assert result.exit_code == 0, result.output
    assert "nothing to prune" in result.output and "nothing to remove: the model is unchanged" in result.output
    code, report = prune_json(path, f"{arch_file}:healthy", "--dry-run")
    assert report["summary"]["removed_units"] == 0
    assert report["summary"]["parameters_after"] == report["summary"]["parameters_before"]


def test_outputs_that_cannot_be_reproduced_fail_the_verification_and_nothing_is_written(
        arch_file: Path, tmp_path: Path) -> None:
    _, path = build(arch_file, "noisy", tmp_path, lambda m: kill(m.conv1, [1, 2]))
    target, report_file = tmp_path / "noisy.onnx", tmp_path / "report.json"
    result = invoke("prune", path, "--arch", f"{arch_file}:noisy", "--data", CALIB, "-o", target,
                    "--report", report_file, "-f", "json")
    assert result.exit_code == 1, result.output
    assert "verification failed" in result.output and "the pruned model was not written" in result.output
    assert not target.exists()
    report = json.loads(report_file.read_text())  # the report says why, for the CI job that reads it
    assert report["verification"]["passed"] is False and report["verification"]["relative_diff"] > 1e-5
    assert report["output"]["written"] is False and report["summary"]["parameters_after"] is None
    assert sorted(tmp_path.iterdir()) == sorted([path, report_file])  # no temporary file left


# ----------------------------------------------------------------------------- options
def test_sites_limits_the_prune(samples_dir: Path) -> None:
    _, only_act2 = prune_json(samples_dir / "digits_mlp_dead.pt", arch_spec("digits_mlp"), "--dry-run", "--sites",
                              "act2")
    by_name = sites(only_act2)
    assert by_name["act1"]["removed_units"] == [] and by_name["act2"]["removed_units"]
    assert only_act2["output"]["written"] is False and only_act2["run"]["sites"] == ["act2"]


@pytest.mark.parametrize("args, message", [
    ([], "give -o FILE for the pruned model"),
    (["-o", "small.txt"], "-o must name a .pt, .pt2 or .onnx file"),
    (["-o", "small.pt", "--tolerance", "-1"], "--tolerance must be a non-negative number"),
])
def test_bad_prune_options_are_one_line_and_exit_2(samples_dir: Path, tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    args = [str(tmp_path / a) if a.startswith("small") else a for a in args]
    result = invoke("prune", samples_dir / "digits_mlp_dead.pt", "--arch", arch_spec("digits_mlp"), "--data", CALIB,
                    *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["digits_mlp_dead.torchscript", "digits_mlp_dead.pt2"])
def test_compiled_graphs_are_pruned_through_their_onnx_export(samples_dir: Path, tmp_path: Path, name: str) -> None:
    import onnxruntime as ort

    target = tmp_path / "small.onnx"
    result = invoke("prune", samples_dir / name, "--data", CALIB, "-o", target, "--trust-checkpoint", "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "pruned through its ONNX export" in report["warnings"][0]
    _, from_state_dict = prune_json(samples_dir / "digits_mlp_dead.pt", arch_spec("digits_mlp"), "--dry-run")
    assert [(s["name"], s["units_after"]) for s in report["sites"]] == \
        [(s["name"], s["units_after"]) for s in from_state_dict["sites"]]
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(samples_dir / "digits_mlp_dead.onnx"), providers=["CPUExecutionProvider"])
    for x in (calibration(), held_out_digits()):
        want = original.run(None, {original.get_inputs()[0].name: x})[0]
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    refused = invoke("prune", samples_dir / name, "--data", CALIB, "-o", tmp_path / "small.pt2", "--trust-checkpoint")
    assert refused.exit_code == 2 and "give -o a .onnx file" in refused.output


def test_the_python_api_returns_a_pruned_copy_and_leaves_the_module_alone(samples_dir: Path) -> None:
    from reluscope.backends import load_model

    module = load_model(samples_dir / "digits_mlp_dead.pt", arch=arch_spec("digits_mlp")).module
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pruned, report = reluscope.prune(module, calibration())
    assert pruned is not module and module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert pruned.fc1.out_features == 128 - len(sites(report)["act1"]["removed_units"]) < 128
    assert report["kind"] == "prune" and report["verification"]["passed"]


def test_the_table_says_what_was_removed_and_the_cost_before_and_after(samples_dir: Path, tmp_path: Path) -> None:
    result = invoke("prune", samples_dir / "digits_mlp_dead.pt", "--arch", arch_spec("digits_mlp"), "--data", CALIB,
                    "--dry-run")
    assert result.exit_code == 0, result.output
    for word in ("pruned sites", "act1", "parameters", "MACs per sample", "CPU latency", "dry run, nothing written"):
        assert word in result.output


# ----------------------------------------------------------------------------- ONNX, and PyTorch vs ONNX
def test_the_dead_mlp_as_onnx_is_pruned_on_the_graph_and_keeps_its_outputs(tmp_path: Path,
                                                                            samples_dir: Path) -> None:
    import onnx
    import onnxruntime as ort

    source, target = samples_dir / "digits_mlp_dead.onnx", tmp_path / "small.onnx"
    result = invoke("prune", source, "--data", CALIB, "-o", target, "-f", "json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= 1e-6
    assert report["summary"]["removed_units"] == report["summary"]["candidates"] > 64
    onnx.checker.check_model(onnx.load(target))
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (source, target)]
    for x in (calibration(), held_out_digits()):
        want, got = (s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    assert report["summary"]["parameters_after"] == 5681  # as the PyTorch prune of the same weights


@pytest.mark.parametrize("stem, factory", [("digits_mlp_dead", "digits_mlp"), ("digits_cnn", "digits_cnn"),
                                           ("digits_mlp", "digits_mlp")])
def test_pytorch_and_onnx_prunes_of_one_model_remove_the_same_units(samples_dir: Path, stem: str,
                                                                     factory: str) -> None:
    _, from_torch = prune_json(samples_dir / f"{stem}.pt", arch_spec(factory), "--dry-run")
    result = invoke("prune", samples_dir / f"{stem}.onnx", "--data", CALIB, "--dry-run", "-f", "json", "-q")
    assert result.exit_code == 0, result.output
    from_onnx = json.loads(result.stdout)
    counts = {name: (site["units_before"], site["units_after"]) for name, site in sites(from_torch).items()}
    assert counts == {name: (site["units_before"], site["units_after"]) for name, site in sites(from_onnx).items()}
    assert from_torch["summary"]["removed_units"] > 0


@pytest.mark.parametrize("stem", ["digits_mlp.pt", "digits_mlp.onnx"])
def test_rarely_active_units_go_only_while_the_outputs_stay_within_the_tolerance(samples_dir: Path,
                                                                                stem: str) -> None:
    args = ["prune", samples_dir / stem, "--data", CALIB, "--dry-run", "--include-rarely-active", "-f", "json",
            "-q", *(["--arch", arch_spec("digits_mlp")] if stem.endswith(".pt") else [])]
    loose = json.loads(invoke(*args, "--tolerance", "1").stdout)
    strict = json.loads(invoke(*args, "--tolerance", "1e-9").stdout)
    rare = [unit for site in loose["sites"] for unit in site["rarely_active_candidates"]]
    assert rare, "the trained MLP has rarely active units"
    assert loose["summary"]["removed_units"] == loose["summary"]["candidates"]
    assert strict["verification"]["passed"] and strict["verification"]["relative_diff"] <= 1e-9
    kept = {(site["name"], item["unit"]): item["reason"] for site in strict["sites"] for item in site["kept_units"]}
    for site in strict["sites"]:
        for unit in site["rarely_active_candidates"]:
            assert "moves the outputs too far" in kept[(site["name"], unit)]


def test_an_onnx_model_is_written_as_onnx_only_and_says_so_before_analysing(samples_dir: Path,
                                                                            tmp_path: Path) -> None:
    result = invoke("prune", samples_dir / "digits_mlp_dead.onnx", "--data", CALIB, "-o", tmp_path / "small.pt")
    assert result.exit_code == 2 and "a pruned ONNX model can only be written as .onnx" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "vgg", "squeeze_excite", "token_mlp", "conv1d",
                                  "two_heads"])
def test_common_architectures_prune_exactly_and_alike_in_pytorch_and_onnx(name: str, tmp_path: Path) -> None:
    from prune_zoo import with_dead_units
    from test_onnx import export

    model, x = with_dead_units(name), calibration()
    pruned, report = reluscope.prune(model, x)
    assert report["verification"]["passed"] and report["summary"]["removed_units"] > 0
    assert report["summary"]["parameters_after"] < report["summary"]["parameters_before"]
    # on the calibration data: units that are dead there by chance (random weights) may fire on other digits
    with torch.no_grad():
        want, got = model(torch.from_numpy(x)), pruned(torch.from_numpy(x))
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))

    path = export(model, torch.from_numpy(x[:4]), tmp_path / f"{name}.onnx")
    _, from_onnx = reluscope.prune(path, x)
    assert from_onnx["verification"]["passed"]
    assert {s["name"]: s["units_after"] for s in from_onnx["sites"]} == \
        {s["name"]: s["units_after"] for s in report["sites"]}


def test_the_pruned_model_never_replaces_a_link_or_the_model_itself(samples_dir: Path, tmp_path: Path) -> None:
    import os

    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"keep me")
    os.symlink(victim, tmp_path / "small.onnx")
    base = ["prune", samples_dir / "digits_mlp_dead.onnx", "--data", CALIB]
    linked = invoke(*base, "-o", tmp_path / "small.onnx")
    assert linked.exit_code == 2 and "symbolic link" in linked.output and victim.read_bytes() == b"keep me"
    itself = invoke(*base, "-o", samples_dir / "digits_mlp_dead.onnx")
    assert itself.exit_code == 2 and "Traceback" not in itself.output
    same = invoke(*base, "-o", tmp_path / "x.onnx", "--report", tmp_path / "x.onnx")
    assert same.exit_code == 2 and not (tmp_path / "x.onnx").exists()


def test_a_pt2_with_a_fixed_batch_size_is_pruned_through_onnx_in_chunks(samples_dir: Path, tmp_path: Path) -> None:
    from reluscope.backends import load_model

    module = load_model(samples_dir / "digits_mlp_dead.pt", arch=arch_spec("digits_mlp")).module.eval()
    fixed = tmp_path / "fixed4.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(4, 1, 8, 8),)), fixed)
    result = invoke("prune", fixed, "--data", CALIB, "-o", tmp_path / "small.onnx", "-f", "json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["removed_units"] == 103 and report["verification"]["max_abs_diff"] <= 1e-6
    assert "Traceback" not in result.output


def test_a_batchnorm_between_a_dead_unit_and_a_depthwise_convolution_needs_no_fold() -> None:
    """relu -> BatchNorm -> depthwise conv: the unit's constant reaches the depthwise channel, which goes with
    it (the coupled site after it is dead too); nothing is folded into the depthwise layer."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)
            self.dw, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()
            self.pw, self.head = nn.Conv2d(8, 4, 1), nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu2(self.dw(self.bn(self.relu1(self.conv(x)))))
            return self.head(torch.flatten(self.pw(x), 1))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.bias.uniform_(-0.5, 0.5)  # BatchNorm turns the dead unit's 0 into a nonzero constant
        kill(model.conv, [3], bias=-10.0)
        kill(model.dw, [3], bias=-1.0)  # ... which the depthwise channel, zeroed, cannot lift above 0
    pruned, report = reluscope.prune(model, calibration())
    assert sites(report)["relu1"]["removed_units"] == [3] and sites(report)["relu2"]["removed_units"] == [3]
    assert report["verification"]["passed"] and pruned.dw.groups == pruned.dw.out_channels == 7
