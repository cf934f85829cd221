"""Command line: thin commands -> config -> api -> render -> exit code.

Imports here stay light (typer, rich): `reluscope --help` must not pay for torch.
Domain errors become one line on stderr and exit code 2; anything else is exit code 3.
"""

from __future__ import annotations

import enum
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from .errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ReluscopeError

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


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(action: Callable[[], int], debug: bool) -> None:
    """Run a command body, mapping errors to the exit-code contract."""
    try:
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
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow unpickling code from the checkpoint "
                                          "(a whole pickled nn.Module). Only for files you trust."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Analyse every ReLU-family activation site of MODEL on calibration data."""

    def body() -> int:
        from . import data as data_sources
        from .config import AnalyzeConfig
        from .output import check_writable, emit

        config = AnalyzeConfig(device=device, batch_size=batch_size, max_samples=max_samples,
                               input_shape=data_sources.parse_shape(input_shape), unit_axis=unit_axis, arch=arch,
                               trust_checkpoint=trust_checkpoint, rare_threshold=rare_threshold,
                               dormant_tau=dormant_tau, gradients=gradients, loss=loss)
        if output is not None:
            check_writable(output)
        report = _run_with_progress(model, data, config, quiet)
        payload = report.to_dict()
        for warning in report.warnings:
            err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        if output_format is OutputFormat.json:
            emit(report.to_json(), output)
        elif output is None:
            from .render import table_renderable

            Console().print(table_renderable(payload))
        else:
            from .render import render_table

            emit(render_table(payload, color=False), output)
        if output is not None and not quiet:
            from .render import summary_text

            err_console.print(summary_text(payload))
            err_console.print(f"report written to {output}", style="dim")
        return EXIT_OK

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


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from . import __version__

        typer.echo(f"reluscope {__version__}")
        raise typer.Exit(EXIT_OK)


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv, prog_name="reluscope")
