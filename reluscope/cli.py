"""Command line: thin commands -> config -> api -> render -> exit code.

Imports here stay light (typer, rich): `reluscope --help` must not pay for torch.
Domain errors become one line on stderr and exit code 2; anything else is exit code 3.
"""

from __future__ import annotations

import inspect
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ReluscopeError, UsageError
from .options import ANALYZE_OPTIONS, CONFIG_HELP, Option, OutputFormat

app = typer.Typer(
    name="reluscope",
    help="Is this trained network healthy? Dead, sparse and saturated ReLU-family units, output ranges and "
    "gradient flow, for PyTorch and ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


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


def _declared_options(options: tuple[Option, ...]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command that takes `**options` one keyword parameter per declared option.

    typer builds a command's parameters from `inspect.signature` (which honours `__signature__`)
    and `typing.get_type_hints` (which reads `__annotations__`), so both are set here.
    """

    def declare(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command)
        parameters = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for option in options:
            extra = {"metavar": option.metavar} if option.metavar is not None else {}
            default = typer.Option(option.default, *option.flags, help=option.help, **extra)
            parameters.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=option.type))
        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {**{p.name: p.annotation for p in parameters}, "return": None}
        return command

    return declare


@app.command()
@_declared_options(ANALYZE_OPTIONS)
def analyze(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="Model file: state_dict (.pt, with --arch), TorchScript, torch.export "
                                 "(.pt2), pickled nn.Module (with --trust-checkpoint) or ONNX. Detected from content."),
    **options: Any,  # one per option in options.ANALYZE_OPTIONS
) -> None:
    """Analyse every ReLU-family activation site of MODEL on calibration data.

    Exit codes: 0 ok, 1 a --fail-on gate failed, 2 bad usage or input, 3 internal error.
    """
    output, quiet, debug = options["output"], options["quiet"], options["debug"]

    def body() -> int:
        from .config import AnalyzeConfig
        from .gate import evaluate, parse_rules
        from .output import check_writable, emit

        opts = _with_settings(ctx, options, _load_settings(options["config_file"], options["no_config"]).analyze)
        fmt = opts["output_format"]
        rules = parse_rules(opts["fail_on"], gradients=opts["gradients"])  # fail fast, before the analysis
        config = AnalyzeConfig.from_cli(opts)
        for target in (output, opts["junit"]):
            if target is not None:
                check_writable(target)
        if opts["html"] is not None:
            _check_html(opts["html"])  # before the analysis: the extra is installed, the file writable
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

            print_table(payload, bars=not opts["no_bars"])
        else:
            from .present.table import render_table
            from .present.table import render_text
            from .present.gates import gate_table

            text = render_table(payload)
            if report.gates:
                text = text.rstrip("\n") + "\n" + render_text(gate_table(report.gates))
            emit(text, output)
        if opts["html"] is not None:
            _write_html(opts["html"], [payload])
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
        from .output import check_writable, emit

        settings = _load_settings(config_file, no_config)
        opts = _with_settings(ctx, given, settings.diff)
        fmt = opts["output_format"]
        rules = parse_rules(opts["fail_on"], diff=True)
        # no rules given anywhere: the default gate; `fail-on = []` in the config: no gate at all
        use_default = not rules and not _given(ctx, "fail_on") and "fail_on" not in settings.diff
        for target in (output, opts["junit"]):
            if target is not None:
                check_writable(target)
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


# ----------------------------------------------------------------------------- HTML: `--html FILE` and `report`
def _check_html(path: Path) -> None:
    from .output import check_writable
    from .present.html import require_plotly

    require_plotly()
    check_writable(path)


def _write_html(path: Path, reports: list[dict[str, Any]], title: Optional[str] = None,
                labels: Optional[List[str]] = None) -> None:
    from .output import write_atomic
    from .present.html import render_html

    write_atomic(path, render_html(reports, title=title, labels=labels))


@app.command("report")
def report_command(
    reports: List[Path] = typer.Argument(..., metavar="REPORT.json...", help="Reports written by `reluscope "
                                         "analyze -f json`. Several are read as a sequence, in the order given: "
                                         "checkpoints of one training run, or base then candidate."),
    html: Path = typer.Option(..., "--html", metavar="FILE", help="Write one self-contained HTML page "
                              "(opens offline). Needs the extra: pip install \"reluscope[html]\"."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title (default: from the model files)."),
    label: Optional[List[str]] = typer.Option(None, "--label", metavar="NAME", help="Name of each report in the "
                                              "charts, once per report in order (default: the model file names)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not say where the page was written."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Render reports already written as one HTML page: charts by depth, unit strips, gates and warnings;
    for several reports, dead share and zero fraction across them and a diff of two.

    Exit codes: 0 written, 2 bad usage or input (no report, a file that is not a report, no Plotly).
    """

    def body() -> int:
        from .diff import load_report

        _check_html(html)
        if label and len(label) != len(reports):
            raise UsageError(f"--label was given {len(label)} times for {len(reports)} reports; give one per report")
        loaded = [load_report(path) for path in reports]
        names = list(label) if label else _report_labels(reports, loaded)
        _write_html(html, loaded, title=title, labels=names)
        if not quiet:
            err_console.print(f"HTML report of {len(loaded)} report{'s' if len(loaded) > 1 else ''} written to {html}",
                              style="dim", highlight=False, soft_wrap=True)
        return EXIT_OK

    run_guarded(body, debug)


def _report_labels(paths: List[Path], reports: List[dict[str, Any]]) -> List[str]:
    """The model file names; the report file names where those repeat (one model, several runs)."""
    from .present.html import report_label

    names = [report_label(r, i) for i, r in enumerate(reports)]
    return names if len(set(names)) == len(names) else [p.stem for p in paths]
