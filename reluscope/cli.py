"""Command line: thin commands -> config -> api -> render -> exit code.

Imports here stay light (typer, rich): `reluscope --help` must not pay for torch.
Domain errors become one line on stderr and exit code 2; anything else is exit code 3.
"""

from __future__ import annotations

import enum
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ReluscopeError, UsageError

app = typer.Typer(
    name="reluscope",
    help="Is this trained network healthy? Dead, sparse and saturated ReLU-family units, output ranges and "
    "gradient flow, for PyTorch and ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


FAIL_ON_HELP = ("Gate rule \\[SCOPE:]METRIC OP NUMBER (OP: > >= < <= == !=); exit 1 when it is true. Repeatable. "
                "No scope: the model-wide summary (e.g. 'dead_fraction>0.05'); a scope is a glob over site names "
                "and fails if any matching site does (e.g. 'features.*:dead_units>1'). Quote it in the shell.")
CONFIG_HELP = ("Config file (reluscope.toml, or pyproject.toml with \\[tool.reluscope]). Default: the nearest one "
               "from the current folder upwards. Command-line options win over it.")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option `name` (command line or environment), not its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _with_settings(ctx: typer.Context, values: dict[str, Any], from_config: dict[str, Any]) -> dict[str, Any]:
    """Config values fill in every option the command line did not set."""
    merged = dict(values)
    for name, value in from_config.items():
        if name in merged and not _given(ctx, name):
            merged[name] = value
    if isinstance(merged.get("output_format"), str):
        merged["output_format"] = OutputFormat(merged["output_format"])
    return merged


def _load_settings(config_file: Optional[Path], no_config: bool) -> Any:
    from .settings import Settings, load_settings

    if no_config:
        if config_file is not None:
            raise UsageError("--config and --no-config exclude each other")
        return Settings()
    return load_settings(config_file)


def _show_gates(gates: list[dict[str, Any]], *, on_stdout: bool, quiet: bool, title: str = "gates") -> None:
    """The gate table: with the payload when that is a table on stdout, else on stderr."""
    if not gates:
        return
    from .present.gates import gate_table

    if on_stdout:
        Console().print(gate_table(gates, title=title))
    elif not quiet:
        err_console.print(gate_table(gates, title=title))
    else:
        from .gate import describe, failed

        for gate in failed(gates):
            err_console.print(f"[bold red]gate failed:[/] {escape(describe(gate))}", highlight=False, soft_wrap=True)


def _gate_exit(gates: list[dict[str, Any]]) -> int:
    from .gate import failed

    return EXIT_GATE_FAILED if failed(gates) else EXIT_OK


def _step_summary(markdown_text: str) -> None:
    from .present.markdown import append_step_summary

    problem = append_step_summary(markdown_text)
    if problem:
        err_console.print(f"[bold yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(action: Callable[[], int], debug: bool) -> None:
    """Run a command body, mapping errors to the exit-code contract."""
    try:
        with warnings.catch_warnings():
            if not debug:
                # Python warnings from torch/numpy/onnx (e.g. torch.load's notes on a damaged pickle's
                # protocol) would print two lines of library source before our one line; reluscope's
                # own warnings go through the report and err_console, not this module.
                warnings.simplefilter("ignore")
            code = action()
    except typer.Exit:
        raise
    except ReluscopeError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: exit 3, not a traceback
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {exc}. Rerun with --debug for the traceback and report it",
              EXIT_INTERNAL)
    else:
        raise typer.Exit(code)


@app.command()
def analyze(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="Model file: state_dict (.pt, with --arch), TorchScript, torch.export "
                                 "(.pt2), pickled nn.Module (with --trust-checkpoint) or ONNX. Detected from content."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Calibration data: .npy, .npz (x/inputs, y/labels), "
                                        ".pt (tensor, tuple or dict) or a folder of images."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture factory for a state_dict: FILE.py:FACTORY "
                                       "or package.module:FACTORY."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape, e.g. 3,224,224: "
                                              "for synthetic data and for resizing image folders."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Samples per forward pass."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", "-n", help="Analyse at most this many samples."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Payload format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the payload to FILE (atomically) "
                                          "instead of stdout."),
    unit_axis: Optional[int] = typer.Option(None, "--unit-axis", help="Override the unit axis (per-sample, batch axis "
                                            "dropped; negative counts from the end)."),
    rare_threshold: float = typer.Option(0.01, "--rare-threshold", help="Active share below which a unit is rarely "
                                         "active."),
    dormant_tau: float = typer.Option(0.025, "--dormant-tau", help="tau of the tau-dormant score for GELU/SiLU/ELU/"
                                      "LeakyReLU sites."),
    gradients: bool = typer.Option(False, "--gradients", help="Also run backward passes and report gradient flow "
                                   "(PyTorch models)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="Loss for --gradients: cross-entropy, predicted-class or "
                                       "half-squared-norm (default: chosen from the data and the output)."),
    percentiles: bool = typer.Option(False, "--percentiles", help="Also report p1/p50/p99/p99.9 of each site's outputs "
                                     "(streaming histogram, relative error <= 0.4%; costs extra passes)."),
    stats_kernel: str = typer.Option("auto", "--stats-kernel", metavar="auto|triton|torch", help="How site statistics "
                                     "are computed: a one-pass Triton kernel or PyTorch reductions. auto: Triton on "
                                     "CUDA where the triton package is installed, PyTorch otherwise."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow unpickling code from the checkpoint "
                                          "(a whole pickled nn.Module, pickled objects in a .pt2 archive). Only for "
                                          "files you trust."),
    fail_on: Optional[List[str]] = typer.Option(None, "--fail-on", metavar="RULE", help=FAIL_ON_HELP),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="FILE", help="Also write the gate results as "
                                         "JUnit XML (one test case per --fail-on rule)."),
    config_file: Optional[Path] = typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP),
    no_config: bool = typer.Option(False, "--no-config", help="Ignore config files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Analyse every ReLU-family activation site of MODEL on calibration data.

    Exit codes: 0 ok, 1 a --fail-on gate failed, 2 bad usage or input, 3 internal error.
    """
    given = {"data": data, "arch": arch, "input_shape": input_shape, "batch_size": batch_size,
             "max_samples": max_samples, "device": device, "output_format": output_format, "unit_axis": unit_axis,
             "rare_threshold": rare_threshold, "dormant_tau": dormant_tau, "gradients": gradients, "loss": loss,
             "percentiles": percentiles, "stats_kernel": stats_kernel,
             "fail_on": fail_on, "junit": junit}

    def body() -> int:
        from . import data as data_sources
        from .config import AnalyzeConfig
        from .gate import evaluate, parse_rules
        from .output import check_distinct_outputs, check_writable, emit

        opts = _with_settings(ctx, given, _load_settings(config_file, no_config).analyze)
        fmt = opts["output_format"]
        rules = parse_rules(opts["fail_on"], gradients=opts["gradients"])  # fail fast, before the analysis
        config = AnalyzeConfig(device=opts["device"], batch_size=opts["batch_size"], max_samples=opts["max_samples"],
                               input_shape=data_sources.parse_shape(opts["input_shape"]), unit_axis=opts["unit_axis"],
                               arch=opts["arch"], trust_checkpoint=trust_checkpoint,
                               rare_threshold=opts["rare_threshold"], dormant_tau=opts["dormant_tau"],
                               gradients=opts["gradients"], loss=opts["loss"], percentiles=opts["percentiles"],
                               stats_kernel=opts["stats_kernel"])
        for target in (output, opts["junit"]):
            if target is not None:
                check_writable(target)
        check_distinct_outputs({"-o": output, "--junit": opts["junit"]}, {"the model": model, "--data": opts["data"], "--arch": opts["arch"]})
        report = _run_with_progress(model, opts["data"], config, quiet)
        from .distributed import world_from_env

        if not world_from_env().is_main:
            return EXIT_OK  # under torchrun, rank 0 alone reports; the others only measured their shard
        report.gates = evaluate(rules, report.to_dict())  # before writing: -o FILE holds the gates
        payload = report.to_dict()
        for warning in report.warnings:
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        if fmt is OutputFormat.json:
            emit(report.to_json(), output)
        elif fmt is OutputFormat.markdown:
            from .present.markdown import report_markdown

            text = report_markdown(payload)
            emit(text, output)
            _step_summary(text)
        elif output is None:
            from .present.table import print_table

            print_table(payload)
        else:
            from .present.table import render_table
            from .present.table import render_text
            from .present.gates import gate_table

            text = render_table(payload)
            if report.gates:
                text = text.rstrip("\n") + "\n" + render_text(gate_table(report.gates))
            emit(text, output)
        if output is not None and not quiet:
            from .present.table import summary_text

            err_console.print(summary_text(payload))
            err_console.print(f"report written to {output}", style="dim")
        _show_gates(report.gates, on_stdout=fmt is OutputFormat.table and output is None, quiet=quiet)
        if opts["junit"] is not None:
            from .present.junit import write_junit

            write_junit(opts["junit"], report.gates, properties={
                "model": payload["model"].get("path"), "format": payload["model"].get("format"),
                "sha256": payload["model"].get("sha256"), "samples": payload["data"].get("samples")},
                seconds=float(payload["run"].get("seconds") or 0.0))
        return _gate_exit(report.gates)

    run_guarded(body, debug)


def _run_with_progress(model: Path, data: Optional[Path], config: Any, quiet: bool) -> Any:
    from .api import run_analysis

    show = not quiet and sys.stderr.isatty()
    if not show:
        return run_analysis(model, data, config)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]analysing"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("analyse", total=None)

        def on_start(total: Optional[int]) -> None:
            bar.update(task, total=total)

        def advance(samples: int) -> None:
            bar.advance(task, samples)

        return run_analysis(model, data, config, progress=advance, on_start=on_start)


@app.command("diff")
def diff_command(
    ctx: typer.Context,
    base: Path = typer.Argument(..., metavar="BASE.json", help="The reference report (reluscope analyze -f json)."),
    new: Path = typer.Argument(..., metavar="NEW.json", help="The report to compare with it."),
    fail_on: Optional[List[str]] = typer.Option(None, "--fail-on", metavar="RULE", help="Gate rule on delta.M "
                                                "(NEW - BASE), base.M or new.M, e.g. 'delta.zero_fraction>0.05' or "
                                                "'conv*:delta.dead_units>0'. Replaces the default gate "
                                                "(exit 1 when NEW has more dead units, model-wide or at any site)."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Payload format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the payload to FILE (atomically)."),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="FILE", help="Also write the gate results as "
                                         "JUnit XML."),
    config_file: Optional[Path] = typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP + " Uses its "
                                               "\\[tool.reluscope.diff] table."),
    no_config: bool = typer.Option(False, "--no-config", help="Ignore config files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No gate table on stderr (failed gates still print)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Compare two JSON reports site by site: dead units, zero fraction, ranges; added and removed sites.

    Exit codes: 0 no gate failed, 1 a gate failed (by default: more dead units in NEW), 2 bad usage or input.
    """
    given = {"output_format": output_format, "fail_on": fail_on, "junit": junit}

    def body() -> int:
        from .diff import default_rules, diff_reports, gate_diff, load_report
        from .gate import parse_rules
        from .output import check_distinct_outputs, check_writable, emit

        settings = _load_settings(config_file, no_config)
        opts = _with_settings(ctx, given, settings.diff)
        fmt = opts["output_format"]
        rules = parse_rules(opts["fail_on"], diff=True)
        # no rules given anywhere: the default gate; `fail-on = []` in the config: no gate at all
        use_default = not rules and not _given(ctx, "fail_on") and "fail_on" not in settings.diff
        for target in (output, opts["junit"]):
            if target is not None:
                check_writable(target)
        check_distinct_outputs({"-o": output, "--junit": opts["junit"]}, {"BASE": base, "NEW": new})
        document = diff_reports(load_report(base), load_report(new), base_path=base, new_path=new)
        document["gates"] = gate_diff(default_rules(document) if use_default else rules, document)
        if fmt is OutputFormat.json:
            import json

            emit(json.dumps(document, indent=2, allow_nan=False), output)
        elif fmt is OutputFormat.markdown:
            from .present.markdown import diff_markdown

            text = diff_markdown(document)
            emit(text, output)
            _step_summary(text)
        else:
            from .present.table import render_text
            from .present.gates import diff_renderable, gate_table

            if output is None:
                Console().print(diff_renderable(document))
            else:
                parts = [diff_renderable(document)] + ([gate_table(document["gates"])] if document["gates"] else [])
                emit(render_text(*parts), output)
        _show_gates(document["gates"], on_stdout=fmt is OutputFormat.table and output is None, quiet=quiet)
        if opts["junit"] is not None:
            from .present.junit import write_junit

            write_junit(opts["junit"], document["gates"], classname="reluscope.diff",
                        properties={"base": str(base), "new": str(new)})
        return _gate_exit(document["gates"])

    run_guarded(body, debug)


@app.command("schema")
def schema_command(
    diff: bool = typer.Option(False, "--diff", help="The schema of `reluscope diff -f json` instead."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write it to FILE (atomically)."),
) -> None:
    """Print the JSON Schema (draft 2020-12) of the JSON report."""

    def body() -> int:
        from .output import emit
        from .schema import schema_json

        emit(schema_json(diff=diff), output)
        return EXIT_OK

    run_guarded(body, False)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from . import __version__

        typer.echo(f"reluscope {__version__}")
        raise typer.Exit(EXIT_OK)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_OK)


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv, prog_name="reluscope")
