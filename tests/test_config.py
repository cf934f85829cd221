"""Config files: `[tool.reluscope]` in pyproject.toml or reluscope.toml, found from the cwd upwards; CLI wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reluscope.cli import app
from reluscope.errors import UsageError
from reluscope.settings import find_config, load_settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
DEAD_MODEL = str(SAMPLES / "digits_mlp_dead.pt")


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/proj, a repository (its config may name code and files), with calibration data and the
    architecture file; cwd is tmp/proj/sub/dir (two levels down)."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / ".git").mkdir()
    shutil.copy(SAMPLES / "digits_calib.npz", proj / "data" / "calib.npz")
    shutil.copy(SAMPLES / "architectures.py", proj / "arch.py")
    nested = proj / "sub" / "dir"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    return proj


def write_pyproject(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text('[project]\nname = "demo"\nversion = "0"\n\n[tool.reluscope]\n' + body)
    return path


# relative paths resolve against the config file's folder, not the cwd
BASE = 'data = "data/calib.npz"\narch = "arch.py:digits_mlp"\n'


def analyze(*args: str):
    return CliRunner().invoke(app, ["analyze", DEAD_MODEL, *args])


def test_pyproject_two_levels_up_supplies_data_arch_and_gates(project: Path) -> None:
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\nbatch-size = 32\nmax-samples = 100\n'
                             'format = "json"\n')
    result = analyze()
    assert result.exit_code == 1, result.output  # the config's gate fails on the dead MLP
    report = json.loads(result.stdout)  # format from the config
    assert report["data"]["samples"] == 100
    assert report["run"]["batch_size"] == 32
    assert report["data"]["source"].endswith("calib.npz")
    assert [g["rule"] for g in report["gates"]] == ["dead_fraction>0.1"]


def test_command_line_wins_over_config(project: Path) -> None:
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\nbatch-size = 32\nformat = "json"\n')
    result = analyze("--fail-on", "dead_fraction>0.9", "-b", "16")
    assert result.exit_code == 0, result.output  # the CLI's rule replaced the config's
    report = json.loads(result.stdout)
    assert report["run"]["batch_size"] == 16
    assert [g["rule"] for g in report["gates"]] == ["dead_fraction>0.9"]
    table = analyze("-f", "table")
    assert table.exit_code == 1
    assert "act1" in table.stdout and not table.stdout.lstrip().startswith("{")


def test_explicit_default_value_on_the_command_line_still_wins(project: Path) -> None:
    write_pyproject(project, BASE + "batch-size = 32\n")
    result = analyze("-b", "64", "-f", "json")  # 64 is the default, but the user said it
    assert json.loads(result.stdout)["run"]["batch_size"] == 64


def test_reluscope_toml_and_nearest_file_win(project: Path) -> None:
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\n')
    (project / "reluscope.toml").write_text(BASE + 'fail-on = ["dead_fraction>0.95"]\n')
    assert analyze().exit_code == 0  # reluscope.toml beats pyproject.toml in the same folder
    (project / "sub" / "reluscope.toml").write_text(
        f'data = "{project / "data" / "calib.npz"}"\narch = "../arch.py:digits_mlp"\nfail-on = "max>10"\n')
    result = analyze("-f", "json")
    assert result.exit_code == 1  # the nearer file (one level up) wins; a single rule string is fine
    assert json.loads(result.stdout)["gates"][0]["rule"] == "max>10"


def test_pyproject_without_our_table_is_passed_over(project: Path) -> None:
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\n')
    (project / "sub" / "pyproject.toml").write_text('[project]\nname = "inner"\n[tool.black]\nline-length = 99\n')
    assert find_config() == project / "pyproject.toml"
    assert analyze().exit_code == 1


def test_lookup_stops_at_the_repository_root(project: Path) -> None:
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\n')
    (project / "sub" / ".git").mkdir()
    assert find_config() is None
    assert load_settings().path is None


def test_explicit_config_and_no_config(project: Path, tmp_path: Path) -> None:
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\n')
    other = tmp_path / "ci.toml"
    other.write_text(BASE.replace('"data/', f'"{project}/data/').replace('"arch.py', f'"{project}/arch.py')
                     + 'fail-on = ["dead_fraction>0.99"]\n')
    assert analyze("--config", str(other)).exit_code == 0
    # --no-config: no data/arch from the file either, so the state_dict cannot be loaded without --arch
    result = analyze("--no-config", "--arch", f"{project / 'arch.py'}:digits_mlp", "--data",
                     str(project / "data" / "calib.npz"))
    assert result.exit_code == 0 and "gates" not in result.stdout
    missing = analyze("--config", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 2 and "nope.toml" in missing.stderr


@pytest.mark.parametrize("body,message", [
    ('batch_size = 32\n', "unknown key 'batch_size'"),
    ('colour = "red"\n', "unknown key 'colour'"),
    ('trust-checkpoint = true\n', "unknown key 'trust-checkpoint'"),
    ('batch-size = "32"\n', "batch-size"),
    ('fail-on = [1, 2]\n', "fail-on"),
    ('format = "yaml"\n', "format"),
    ('gradients = "yes"\n', "gradients"),
    ('fail-on = ["dead_fraction>>0.1"]\n', "malformed"),
    ('[tool.reluscope.diff]\ncolour = 1\n', "unknown key 'colour' in [tool.reluscope.diff]"),
])
def test_bad_config_is_a_usage_error_naming_file_and_key(project: Path, body: str, message: str) -> None:
    path = write_pyproject(project, body)
    result = analyze()
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    if "malformed" not in message:
        assert str(path) in result.stderr
    assert "Traceback" not in result.output


def test_invalid_toml_is_a_usage_error(project: Path) -> None:
    (project / "reluscope.toml").write_text("fail-on = [\n")
    result = analyze()
    assert result.exit_code == 2
    assert "reluscope.toml" in result.stderr and "not valid TOML" in result.stderr


def test_broken_unrelated_pyproject_is_ignored(project: Path) -> None:
    (project / "sub" / "pyproject.toml").write_text("this is [not toml\n")
    write_pyproject(project, BASE)
    assert find_config() == project / "pyproject.toml"


def test_settings_values_and_paths(project: Path) -> None:
    write_pyproject(project, BASE + 'input-shape = [1, 8, 8]\nrare-threshold = 0\ndevice = "cpu"\n'
                             'junit = "out/gates.xml"\ngradients = true\n'
                             '[tool.reluscope.diff]\nfail-on = ["delta.dead_units>2"]\nformat = "markdown"\n')
    settings = load_settings()
    assert settings.path == (project / "pyproject.toml").resolve()
    values = settings.analyze
    assert values["data"] == project.resolve() / "data" / "calib.npz"
    assert values["arch"] == f"{project.resolve() / 'arch.py'}:digits_mlp"
    assert values["input_shape"] == "1,8,8"
    assert values["rare_threshold"] == 0.0 and isinstance(values["rare_threshold"], float)
    assert values["junit"] == project.resolve() / "out" / "gates.xml"
    assert values["gradients"] is True
    assert settings.diff == {"fail_on": ["delta.dead_units>2"], "output_format": "markdown"}
    # a module:factory spec is not a path and stays as it is
    (project / "reluscope.toml").write_text('arch = "mypkg.models:build"\n')
    assert load_settings().analyze["arch"] == "mypkg.models:build"


def test_config_junit_is_written(project: Path) -> None:
    (project / "out").mkdir()
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\njunit = "out/gates.xml"\n')
    assert analyze("-q").exit_code == 1
    assert "dead_fraction&gt;0.1" in (project / "out" / "gates.xml").read_text()


def test_diff_uses_its_own_table(project: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    write_pyproject(project, BASE)
    assert analyze("-f", "json", "-o", str(report), "-q").exit_code == 0
    # the analyze rules (not valid in diff) are not used by diff; the diff table's are
    write_pyproject(project, BASE + 'fail-on = ["dead_fraction>0.1"]\n'
                             '[tool.reluscope.diff]\nfail-on = ["delta.dead_units>=0"]\nformat = "json"\n')
    result = CliRunner().invoke(app, ["diff", str(report), str(report)])
    assert result.exit_code == 1, result.output  # delta 0 >= 0 fails: the config's diff rule ran
    assert json.loads(result.stdout)["gates"][0]["rule"] == "delta.dead_units>=0"
    result = CliRunner().invoke(app, ["diff", str(report), str(report), "--fail-on", "delta.dead_units>0",
                                      "-f", "table"])
    assert result.exit_code == 0 and "delta.dead_units>0" in result.stdout


def test_load_settings_errors(tmp_path: Path) -> None:
    bare = tmp_path / "pyproject.toml"
    bare.write_text('[project]\nname = "x"\n')
    with pytest.raises(UsageError, match="no \\[tool.reluscope\\] table"):
        load_settings(bare)
    weird = tmp_path / "reluscope.toml"
    weird.write_text("diff = 3\n")
    with pytest.raises(UsageError, match="must be a table"):
        load_settings(weird)


def test_empty_diff_rules_in_config_mean_no_gate(project: Path, tmp_path: Path) -> None:
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    write_pyproject(project, BASE)
    assert CliRunner().invoke(app, ["analyze", str(SAMPLES / "digits_mlp.pt"), "-f", "json", "-o", str(base),
                                    "-q"]).exit_code == 0
    assert analyze("-f", "json", "-o", str(new), "-q").exit_code == 0
    assert CliRunner().invoke(app, ["diff", str(base), str(new)]).exit_code == 1  # default: more dead units
    write_pyproject(project, BASE + "[tool.reluscope.diff]\nfail-on = []\n")
    result = CliRunner().invoke(app, ["diff", str(base), str(new), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gates"] == []
