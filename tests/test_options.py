"""Each option of `reluscope analyze` is declared once (reluscope.options): the command's flags and help,
the keywords of `reluscope.analyze`, AnalyzeConfig's fields and the config-file keys all follow from
that declaration. Through the real CLI (CliRunner), real config files and real analyses."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import reluscope
from reluscope.api import analyze as api_analyze
from reluscope.cli import app
from reluscope.config import AnalyzeConfig
from reluscope.errors import UsageError
from reluscope.options import ANALYSIS_OPTIONS, ANALYZE_OPTIONS
from reluscope.settings import load_settings

from conftest import ARCHITECTURES, CALIB, SAMPLES

runner = CliRunner()
WIDE = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
MODEL = str(SAMPLES / "digits_mlp_dead.pt")


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def test_names_and_flags_are_unique() -> None:
    names = [o.name for o in ANALYZE_OPTIONS]
    flags = [f for o in ANALYZE_OPTIONS for f in o.flags]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)
    assert all(o.flags[0].startswith("--") for o in ANALYZE_OPTIONS)
    # a reason for refusing a key only makes sense for an option that is not a key
    assert all(o.config is None for o in ANALYZE_OPTIONS if o.not_in_config)


# ----------------------------------------------------------------------------- the command line
def test_every_declared_option_is_in_analyze_help() -> None:
    result = runner.invoke(app, ["analyze", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for option in ANALYZE_OPTIONS:
        for flag in option.flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
        assert option.help.replace("\\[", "[")[:40] in text, option.name
        if option.default not in (None, False):
            assert f"[default: {getattr(option.default, 'value', option.default)}]" in text, option.name
    # and no option that is not declared
    declared = {flag for o in ANALYZE_OPTIONS for flag in o.flags if flag.startswith("--")}
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) == declared | {"--help"}


def _uses(project: Path) -> dict[str, tuple[list[str], str | None]]:
    """A non-default value for every declared option: as command-line arguments, and as a line of a
    config file (None where the option is no config key). The two spell the same value."""
    return {
        "data": (["--data", str(project / "calib.npz")], 'data = "calib.npz"'),
        "arch": (["--arch", f"{project / 'arch.py'}:digits_mlp"], 'arch = "arch.py:digits_mlp"'),
        "input_shape": (["--input-shape", "64"], "input-shape = [64]"),
        "normalize": (["--normalize", "0.5,0.25"], 'normalize = "0.5,0.25"'),
        "batch_size": (["-b", "32"], "batch-size = 32"),
        "max_samples": (["-n", "100"], "max-samples = 100"),
        "max_length": (["--max-length", "64"], "max-length = 64"),
        "device": (["--device", "cpu"], 'device = "cpu"'),
        "output_format": (["-f", "json"], 'format = "json"'),
        "output": (["-o", "REPORT"], None),
        "unit_axis": (["--unit-axis", "-1"], "unit-axis = -1"),
        "rare_threshold": (["--rare-threshold", "0.2"], "rare-threshold = 0.2"),
        "dormant_tau": (["--dormant-tau", "0.1"], "dormant-tau = 0.1"),
        "gradients": (["--gradients"], "gradients = true"),
        "loss": (["--loss", "predicted-class"], 'loss = "predicted-class"'),
        "percentiles": (["--percentiles"], "percentiles = true"),
        "stats_kernel": (["--stats-kernel", "torch"], 'stats-kernel = "torch"'),
        "trust_checkpoint": (["--trust-checkpoint"], None),
        "timeout": (["--timeout", "600"], None),
        "html": (["--html", str(project / "report.html")], None),
        "no_bars": (["--no-bars"], None),
        "fail_on": (["--fail-on", "dead_fraction>0.99"], 'fail-on = ["dead_fraction>0.99"]'),
        "junit": (["--junit", str(project / "gates.xml")], 'junit = "gates.xml"'),
        "config_file": (["--config", str(project / "reluscope.toml")], None),
        "no_config": (["--no-config"], None),
        "quiet": (["-q"], None),
        "debug": (["--debug"], None),
    }


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = (tmp_path / "proj").resolve()
    folder.mkdir()
    (folder / "calib.npz").write_bytes(CALIB.read_bytes())
    (folder / "arch.py").write_bytes(ARCHITECTURES.read_bytes())
    (folder / ".git").mkdir()  # the config lookup stops here
    monkeypatch.chdir(folder)
    return folder


def test_uses_cover_every_declared_option(project: Path) -> None:
    uses = _uses(project)
    assert set(uses) == {o.name for o in ANALYZE_OPTIONS}
    assert {n for n, (_, line) in uses.items() if line is not None} == \
        {o.name for o in ANALYZE_OPTIONS if o.config is not None}


def _comparable(report_file: Path) -> dict[str, Any]:
    report = json.loads(report_file.read_text())
    report["run"].pop("seconds")
    return report


def test_every_option_set_on_the_command_line_or_in_a_config_file_gives_the_same_report(project: Path) -> None:
    uses = _uses(project)
    # 1. everything on the command line (all but --config, which --no-config excludes)
    args = [a for name, (cli, _) in uses.items() if name != "config_file" for a in cli]
    args[args.index("REPORT")] = str(project / "cli.json")
    on_cli = runner.invoke(app, ["analyze", MODEL, *args])
    assert on_cli.exit_code == 0, on_cli.output
    cli_gates = (project / "gates.xml").read_text()
    (project / "gates.xml").unlink()
    # 2. every config key in the file, only what is no config key on the command line
    (project / "reluscope.toml").write_text("\n".join(line for _, line in uses.values() if line is not None) + "\n")
    args = [a for name, (cli, line) in uses.items() if line is None and name != "no_config" for a in cli]
    args[args.index("REPORT")] = str(project / "file.json")
    from_file = runner.invoke(app, ["analyze", MODEL, *args])
    assert from_file.exit_code == 0, from_file.output
    report = _comparable(project / "cli.json")
    assert report == _comparable(project / "file.json")
    assert (project / "gates.xml").read_text().split("time=")[0] == cli_gates.split("time=")[0]
    # and the values arrived (non-defaults, so a dropped option shows)
    assert report["data"]["samples"] == 100
    assert report["run"] | {"device": "cpu", "rare_threshold": 0.2, "dormant_tau": 0.1, "batch_size": 32,
                            "stats_kernel": "torch"} == report["run"]
    assert report["gradient_flow"] and "percentiles" in json.dumps(report["layers"])
    assert [g["rule"] for g in report["gates"]] == ["dead_fraction>0.99"]
    assert any("--normalize 0.5,0.25 applies to folders of images only" in w for w in report["warnings"])


def test_trust_checkpoint_in_a_config_file_is_refused_saying_why(project: Path) -> None:
    for name in ("reluscope.toml", "pyproject.toml"):
        body = "trust-checkpoint = true\n"
        if name == "pyproject.toml":
            (project / "reluscope.toml").unlink()
            body = "[tool.reluscope]\n" + body
        (project / name).write_text(body)
        result = runner.invoke(app, ["analyze", MODEL, "--data", str(project / "calib.npz")])
        assert result.exit_code == 2, result.output
        assert result.stdout == "" and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
        line = result.stderr.strip()
        assert line.startswith("error: config file ") and str(project / name) in line
        assert "'trust-checkpoint'" in line and "deliberately not a config key" in line
        assert "run code" in line and "Pass --trust-checkpoint on the command line" in line
    # on the command line it is what it always was
    assert ("--trust-checkpoint" in runner.invoke(app, ["analyze", "--help"], env=WIDE).stdout)


@pytest.mark.parametrize("option", ANALYZE_OPTIONS, ids=lambda o: o.name)
def test_config_key_is_accepted_exactly_where_declared(project: Path, option: Any) -> None:
    line = _uses(project)[option.name][1]
    file = project / "reluscope.toml"
    if option.config is not None:
        assert line is not None
        file.write_text(line + "\n")
        assert list(load_settings(file).analyze) == [option.name]
    else:
        file.write_text(f"{option.key} = true\n")
        with pytest.raises(UsageError, match=f"unknown key '{option.key}'"):
            load_settings(file)
    # the [diff] table takes only the options declared for it
    file.write_text(f"[diff]\n{line or f'{option.key} = true'}\n")
    if option.diff:
        assert list(load_settings(file).diff) == [option.name]
    else:
        with pytest.raises(UsageError, match=f"unknown key '{option.key}' in \\[diff\\]"):
            load_settings(file)


# ----------------------------------------------------------------------------- the library
def test_api_keywords_and_config_fields_are_the_analysis_options() -> None:
    names = [o.name for o in ANALYSIS_OPTIONS]
    assert [f.name for f in dataclasses.fields(AnalyzeConfig)] == names
    assert {f.name: f.default for f in dataclasses.fields(AnalyzeConfig)} == {o.name: o.default for o in ANALYSIS_OPTIONS}
    parameters = inspect.signature(api_analyze).parameters
    keywords = [n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert keywords == ["progress", "on_start", *names]
    assert all(parameters[o.name].default == o.default for o in ANALYSIS_OPTIONS)
    assert all(o.help in (api_analyze.__doc__ or "") for o in ANALYSIS_OPTIONS)
    # the command-line-only options are not analysis settings
    assert {"output_format", "output", "fail_on", "junit", "data", "quiet"}.isdisjoint(names)


def test_api_accepts_every_declared_keyword_and_refuses_others() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(40, 6)
    values = {"arch": None, "input_shape": [6], "batch_size": 16, "max_samples": 30, "max_length": 64, "device": "cpu",
              "unit_axis": -1, "rare_threshold": 0.2, "dormant_tau": 0.1, "gradients": True,
              "loss": "half-squared-norm", "percentiles": True, "stats_kernel": "torch", "trust_checkpoint": True,
              "normalize": "imagenet"}
    assert set(values) == {o.name for o in ANALYSIS_OPTIONS}
    report = reluscope.analyze(model, x, **values).to_dict()
    assert report["data"]["samples"] == 30
    assert report["run"] | {"rare_threshold": 0.2, "dormant_tau": 0.1, "batch_size": 16,
                            "stats_kernel": "torch"} == report["run"]
    assert report["gradient_flow"] and "percentiles" in report["layers"][0]
    config = AnalyzeConfig.from_keywords(values)
    assert config.input_shape == (6,) and config.trust_checkpoint is True
    assert config.normalize.method == "imagenet" and config.normalize.std == (0.229, 0.224, 0.225)
    assert any("--normalize imagenet applies to folders of images only" in w for w in report["warnings"])
    for wrong in ("batchsize", "fail_on", "output_format", "junit"):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{wrong}'.*Known options: arch"):
            reluscope.analyze(model, x, **{wrong: 1})


def test_docs_list_exactly_the_declared_config_keys() -> None:
    from reluscope.settings import ANALYZE_KEYS, DIFF_KEYS

    text = " ".join((SAMPLES.parent / "docs" / "ci.md").read_text().split())
    analyze_part = text.split("Keys for `analyze`:")[1].split("Keys for `diff`:")[0]
    diff_part = text.split("Keys for `diff`:")[1].split(".")[0]
    assert set(re.findall(r"`([a-z-]+)`", analyze_part)) == set(ANALYZE_KEYS)
    assert set(re.findall(r"`([a-z-]+)`", diff_part)) == set(DIFF_KEYS)
