"""Command line: thin commands -> options -> api -> one emit path (payload, gates, JUnit) -> exit code.

Imports here stay light (typer, rich): `reluscope --help` must not pay for torch.
Domain errors become one line on stderr and exit code 2; anything else is exit code 3.
SIGINT (Ctrl-C) and SIGTERM end any command within a fraction of a second with exit 130 / 143
and one line: the analysis runs in a worker thread (a model's forward pass may never return to
Python: an ONNX `Loop` with a 2^62 trip count, a TorchScript `while`), the main thread waits for
it and handles the signals and `--timeout`; nothing has been written while the analysis runs, and
the writes afterwards leave no temporary file (output.write_together). When the worker is still
stuck in the model, the process ends with `os._exit` after the error line.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.text import Text

from .errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ReluscopeError, UsageError
from .options import ANALYZE_OPTIONS, CONFIG_HELP, PRUNE_OPTIONS, Option, OutputFormat

def _fold_help_words() -> None:
    """Help at 80 columns (a CI log): Rich cuts a word wider than its column to "…"; typer's help
    texts are made to fold it onto the next line instead (once, when help is first formatted)."""
    from typer import rich_utils

    make = getattr(rich_utils, "_make_rich_text", None)
    if make is None or getattr(make, "folds", False):
        return

    def folded(*args: Any, **kwargs: Any) -> Any:
        text = make(*args, **kwargs)
        if isinstance(text, Text):
            text.overflow = "fold"
        return text

    folded.folds = True  # type: ignore[attr-defined]
    rich_utils._make_rich_text = folded


class _Command(typer.core.TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _fold_help_words()
        return super().format_help(ctx, formatter)


class _Group(typer.core.TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _fold_help_words()
        return super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
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
    settings = load_settings(config_file)
    from .present.cells import visible

    for note in settings.warnings:
        err_console.print(Text.assemble(("warning:", "bold yellow"), " ", visible(note)), highlight=False,
                          soft_wrap=True)
    return settings


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    from .present.cells import visible

    err_console.print(Text.assemble(("error:", "bold red"), " ", visible(message)), highlight=False, soft_wrap=True)
    if _ABANDONED:
        # a worker given up on may still be in the model's forward pass, or have left native
        # threads of onnxruntime/torch running: leave now, without the interpreter's shutdown
        # (which would tear the runtime down under them and abort)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


_OUT_OF_MEMORY = "reluscope ran out of memory; give it less at a time (--batch-size, --input-shape, --max-samples)"
_ABANDONED: list[threading.Thread] = []  # workers given up on (interrupted, timed out)
_SIGNAL_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


def in_worker(work: Callable[[], Any], timeout: Optional[float] = None) -> Any:
    """`work()` in a worker thread, while this thread waits: Ctrl-C and SIGTERM (as `Interrupted`)
    and `timeout` end the wait however long the work is stuck in native code."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="reluscope-analysis", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    thread.start()
    try:
        while thread.is_alive():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                raise UsageError(f"the analysis did not finish within --timeout {timeout:g} s (a model that never "
                                 "finishes, or more data than that time allows); raise --timeout, or pass fewer "
                                 "samples with --max-samples")
            thread.join(left)
    except BaseException:
        _ABANDONED.append(thread)
        raise
    if "error" in result:
        raise result["error"]
    return result.get("value")


def run_guarded(action: Callable[[], int], debug: bool) -> None:
    """Run a command body, mapping errors to the exit-code contract."""
    from .output import Interrupted, handling_signals

    try:
        with warnings.catch_warnings(), handling_signals():
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
    except Interrupted as exc:
        _fail(_SIGNAL_NAMES.get(exc.signum, f"stopped by signal {exc.signum}"), 128 + exc.signum)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except MemoryError:
        if debug:
            traceback.print_exc()
        _fail(_OUT_OF_MEMORY)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: exit 3, not a traceback
        if debug:
            traceback.print_exc()
        if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # torch's CPU allocator
            _fail(_OUT_OF_MEMORY)
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


@app.command(cls=_Command)
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
        from .gate import evaluate, needs_percentiles, parse_rules
        from .output import check_distinct_outputs, check_writable

        opts = _with_settings(ctx, options, _load_settings(options["config_file"], options["no_config"]).analyze)
        fmt = opts["output_format"]
        rules = parse_rules(opts["fail_on"], gradients=opts["gradients"])  # fail fast, before the analysis
        if needs_percentiles(rules):
            opts["percentiles"] = True  # a percentile gate needs what --percentiles measures
        config = AnalyzeConfig.from_cli(opts)
        for target in (output, opts["junit"]):
            if target is not None:
                check_writable(target)
        check_distinct_outputs({"-o": output, "--junit": opts["junit"], "--html": opts["html"]},
                               {"the model": model, "--data": opts["data"], "--arch": opts["arch"]})
        if opts["html"] is not None:
            _check_html(opts["html"])  # before the analysis: the extra is installed, the file writable
        timeout = opts["timeout"]
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise UsageError(f"--timeout must be a positive number of seconds, not {timeout}")
        report = _run_with_progress(model, opts["data"], config, quiet, timeout)
        from .distributed import world_from_env

        if not world_from_env().is_main:
            return EXIT_OK  # under torchrun, rank 0 alone reports; the others only measured their shard
        from .present.emit import emit_document

        payload = report.to_dict()
        payload["gates"] = evaluate(rules, payload)  # before writing: -o FILE holds the gates
        pages = [] if opts["html"] is None else [(opts["html"], _render_html([payload]))]
        return emit_document(payload, fmt, output=output, junit=opts["junit"], quiet=quiet, err=err_console,
                             also=pages, bars=not opts["no_bars"])

    run_guarded(body, debug)


def _run_with_progress(model: Path, data: Optional[Path], config: Any, quiet: bool, timeout: Optional[float]) -> Any:
    """The analysis in a worker thread (see `in_worker`), with a progress bar on a terminal."""
    from .api import run_analysis

    from .distributed import world_from_env

    # under torchrun, rank 0 alone shows progress (the torch backend counts every rank's batches there)
    show = not quiet and sys.stderr.isatty() and world_from_env().is_main
    if not show:
        return in_worker(lambda: run_analysis(model, data, config), timeout)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]analysing"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("analyse", total=None)

        def on_start(total: Optional[int]) -> None:
            bar.update(task, total=total)

        def advance(samples: int) -> None:
            bar.advance(task, samples)

        return in_worker(lambda: run_analysis(model, data, config, progress=advance, on_start=on_start), timeout)


@app.command("prune", cls=_Command)
@_declared_options(PRUNE_OPTIONS)
def prune_command(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="Model file, as for `reluscope analyze`: a state_dict (with --arch), a "
                                 "pickled nn.Module (with --trust-checkpoint) or ONNX."),
    **options: Any,  # one per option in options.PRUNE_OPTIONS
) -> None:
    """Remove the units that are dead on the calibration data (exactly 0 at a ReLU, ReLU6 or clamp) and
    write a smaller model with the same outputs, verified on that data.

    Exit codes: 0 pruned, 1 verification failed (no model written), 2 bad usage or input, 3 internal error.
    """
    output, report_file, quiet, debug = options["output"], options["report"], options["quiet"], options["debug"]

    def body() -> int:
        from .config import AnalyzeConfig
        from .output import check_distinct_outputs, check_writable
        from .pruning import PruneSettings

        opts = _with_settings(ctx, options, _load_settings(options["config_file"], options["no_config"]).analyze)
        if output is None and not opts["dry_run"]:
            raise UsageError("give -o FILE for the pruned model (.pt, .pt2 or .onnx), or --dry-run to report only")
        config = AnalyzeConfig.from_cli(opts)
        settings = PruneSettings(tolerance=opts["tolerance"], sites=tuple(opts["sites"] or ()),
                                 include_rarely_active=opts["include_rarely_active"], dry_run=opts["dry_run"],
                                 output_suffix=None if output is None else output.suffix.lower())
        targets = {"-o": None if opts["dry_run"] else output, "--report": report_file}
        for target in targets.values():
            if target is not None:
                check_writable(target)
        check_distinct_outputs(targets, {"the model": model, "--data": opts["data"], "--arch": opts["arch"]})
        timeout = opts["timeout"]
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise UsageError(f"--timeout must be a positive number of seconds, not {timeout}")
        from .pruning import run_prune

        if quiet or not sys.stderr.isatty():
            result = in_worker(lambda: run_prune(model, opts["data"], config, settings), timeout)
        else:  # on a terminal: which step is running (pruning a large model takes a while)
            with err_console.status("analysing") as status:
                result = in_worker(lambda: run_prune(model, opts["data"], config, settings,
                                                     on_stage=lambda name: status.update(name)), timeout)
        from .present.prune import emit_prune

        return emit_prune(result, opts["output_format"], model_file=targets["-o"], report_file=report_file,
                          quiet=quiet, err=err_console)

    run_guarded(body, debug)


@app.command("diff", cls=_Command)
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
        from .output import check_distinct_outputs, check_writable

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
        from .present.emit import emit_document

        return emit_document(document, fmt, output=output, junit=opts["junit"], quiet=quiet, err=err_console)

    run_guarded(body, debug)


@app.command("schema", cls=_Command)
def schema_command(
    diff: bool = typer.Option(False, "--diff", help="The schema of `reluscope diff -f json` instead."),
    prune: bool = typer.Option(False, "--prune", help="The schema of `reluscope prune -f json` instead."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write it to FILE (atomically)."),
) -> None:
    """Print the JSON Schema (draft 2020-12) of the JSON report."""

    def body() -> int:
        from .output import emit
        from .schema import schema_json

        if diff and prune:
            raise UsageError("--diff and --prune exclude each other: one schema at a time")
        emit(schema_json(diff=diff, prune=prune), output)
        return EXIT_OK

    run_guarded(body, False)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from ._version import __version__

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


def _render_html(reports: list[dict[str, Any]], title: Optional[str] = None,
                 labels: Optional[List[str]] = None) -> str:
    from .present.html import render_html

    return render_html(reports, title=title, labels=labels)


@app.command("report", cls=_Command)
def report_command(
    reports: List[Path] = typer.Argument(..., metavar="REPORT.json...", help="Reports written by `reluscope "
                                         "analyze -f json`. Several are read as a sequence, in the order given: "
                                         "checkpoints of one training run, or base then candidate."),
    html: Path = typer.Option(..., "--html", metavar="FILE", help="Write one self-contained HTML page "
                              "(opens offline). Needs the extra: pip install \"reluscope\\[html]\"."),
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
        from .output import check_distinct_outputs, write_together

        check_distinct_outputs({"--html": html}, {f"REPORT {i + 1}": path for i, path in enumerate(reports)})
        _check_html(html)
        if label and len(label) != len(reports):
            raise UsageError(f"--label was given {len(label)} times for {len(reports)} reports; give one per report")
        loaded = [load_report(path) for path in reports]
        names = list(label) if label else _report_labels(reports, loaded)
        write_together([(html, _render_html(loaded, title=title, labels=names))])
        if not quiet:
            plural = "s" if len(loaded) > 1 else ""
            from .present.cells import visible

            err_console.print(Text(f"HTML report of {len(loaded)} report{plural} written to {visible(str(html))}",
                                   style="dim"), highlight=False, soft_wrap=True)
        return EXIT_OK

    run_guarded(body, debug)


def _report_labels(paths: List[Path], reports: List[dict[str, Any]]) -> List[str]:
    """The model file names; the report file names where those repeat (one model, several runs)."""
    from .present.html import report_label

    names = [report_label(r, i) for i, r in enumerate(reports)]
    return names if len(set(names)) == len(names) else [p.stem for p in paths]
