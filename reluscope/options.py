"""Every option of `reluscope analyze`, declared once.

One `Option` record per option says its name (the command's parameter, the `AnalyzeConfig` field and
the keyword of `reluscope.analyze`), its default, its flags and help text, and whether a config file
may set it. The rest follows from the records:

- the `analyze` command's parameters (cli.py builds its signature from `ANALYZE_OPTIONS`),
- the fields of `AnalyzeConfig` and the keywords `reluscope.analyze` accepts (`ANALYSIS_OPTIONS`),
- the config-file keys of `analyze` and of `diff` (settings.py: `ANALYZE_KEYS`, `DIFF_KEYS`).

Imports stay light (no typer, torch or numpy): the library and `reluscope --help` both read this.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

from .errors import UsageError

FORMATS = ("table", "json", "markdown")


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


FAIL_ON_HELP = ("Gate rule \\[SCOPE:]METRIC OP NUMBER (OP: > >= < <= == !=); exit 1 when it is true. Repeatable. "
                "No scope: the model-wide summary (e.g. 'dead_fraction>0.05'); a scope is a glob over site names "
                "and fails if any matching site does (e.g. 'features.*:dead_units>1'). Quote it in the shell.")
CONFIG_HELP = ("Config file (reluscope.toml, or pyproject.toml with \\[tool.reluscope]). Default: the nearest one "
               "from the current folder upwards. Command-line options win over it.")


# ----------------------------------------------------------------------------- config-file values
# Each takes the value as TOML read it and the folder of the config file (for relative paths), and
# returns what the command line would have handed over; a TypeError says what was expected.
ConfigConverter = Callable[[Any, Path], Any]


def _int(value: Any, base: Path | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _float(value: Any, base: Path | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _str(value: Any, base: Path | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {type(value).__name__} {value!r}")
    return value


def _bool(value: Any, base: Path | None = None) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
    return value


def _format(value: Any, base: Path | None = None) -> OutputFormat:
    if value not in FORMATS:
        raise TypeError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return OutputFormat(value)


def _rules(value: Any, base: Path | None = None) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of rule strings, got {value!r}")
    return list(value)


def _shape(value: Any, base: Path | None = None) -> str:
    """`"3,224,224"` or `[3, 224, 224]`; handed on as the CLI's text form."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    raise TypeError(f"expected a string like \"3,224,224\" or a list of integers, got {value!r}")


def _path(value: Any, base: Path) -> Path:
    """Relative to the config file's folder."""
    path = Path(_str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _arch(value: Any, base: Path) -> str:
    """`FILE.py:FACTORY` gets its file resolved against the config's folder; `package.module:F` stays."""
    spec = _str(value)
    target, sep, factory = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target or "\\" in target):
        file = Path(target).expanduser()
        return f"{file if file.is_absolute() else base / file}:{factory}"
    return spec


# ----------------------------------------------------------------------------- command line and API values
MAX_SAMPLE_ELEMENTS = 2**31 - 1  # per sample: beyond int32 indexing, and 8 GB of float32 for each one
MAX_SHAPE_AXES = 32
def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """`3,224,224` (or `3x224x224`) as a tuple of positive ints."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError as exc:
        raise UsageError(f"--input-shape {text!r} must be comma-separated integers, e.g. 3,224,224") from exc
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers, e.g. 3,224,224")
    elements = 1
    for d in shape:
        elements *= d
    if len(shape) > MAX_SHAPE_AXES or elements > MAX_SAMPLE_ELEMENTS:
        raise UsageError(f"--input-shape {text!r} asks for {elements:.3g} values per sample, more than reluscope "
                         f"allocates (at most {MAX_SAMPLE_ELEMENTS:,} values in at most {MAX_SHAPE_AXES} axes); give the "
                         "shape of one sample, e.g. 3,224,224")
    return shape


# ImageNet's per-channel (R, G, B) mean and standard deviation of 0..1 pixels, as torchvision's
# pretrained models expect them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_HELP = ("How image-folder pixels (0..1 after dividing by 255) are normalised: none, imagenet "
                  "(mean 0.485,0.456,0.406, std 0.229,0.224,0.225) or MEAN,STD (one pair for every channel, "
                  "or C means then C stds). Use what the model was trained with.")


@dataclass(frozen=True)
class Normalize:
    """What is done to image-folder pixels after scaling them to 0..1: (x - mean) / std per channel.
    `mean`/`std` hold one value (every channel) or one per channel; empty for `none`."""

    method: str  # "none", "imagenet" or "custom"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The report's `data.normalize`."""
        if self.method == "none":
            return {"method": "none"}
        return {"method": self.method, "mean": list(self.mean), "std": list(self.std)}


NO_NORMALIZE = Normalize("none")


def parse_normalize(value: Any) -> Normalize:
    """`none`, `imagenet`, `MEAN,STD` or `M1,...,MC,S1,...,SC` (text, from the command line or a
    config file); the API also takes a `Normalize` or a (mean, std) pair of numbers or sequences."""
    import math

    if value is None:
        return NO_NORMALIZE
    if isinstance(value, Normalize):
        return value
    what = f"--normalize {value!r}"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "none":
            return NO_NORMALIZE
        if text == "imagenet":
            return Normalize("imagenet", IMAGENET_MEAN, IMAGENET_STD)
        try:
            numbers = [float(part) for part in text.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) < 2 or len(numbers) % 2:
            raise UsageError(f"{what} must be none, imagenet, MEAN,STD or C means then C stds "
                             "(e.g. 0.5,0.5 or 0.485,0.456,0.406,0.229,0.224,0.225)")
        half = len(numbers) // 2
        mean, std = tuple(numbers[:half]), tuple(numbers[half:])
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            mean, std = (tuple(float(v) for v in (part if isinstance(part, (tuple, list)) else (part,)))
                         for part in value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"normalize={value!r} must be a (mean, std) pair of numbers or sequences") from exc
        if len(mean) != len(std) or not mean:
            raise UsageError(f"normalize={value!r}: give as many means as standard deviations")
    else:
        raise UsageError(f"normalize={value!r} must be 'none', 'imagenet', 'MEAN,STD' or a (mean, std) pair")
    if not all(math.isfinite(v) for v in mean + std) or any(v <= 0 for v in std):
        raise UsageError(f"{what}: means must be finite numbers and standard deviations positive")
    return Normalize("custom", mean, std)


def _shape_from_text(text: str | None) -> tuple[int, ...] | None:
    return parse_shape(text)


def _shape_from_api(shape: Any) -> tuple[int, ...] | None:
    return tuple(shape) if shape is not None else None


def _same(value: Any) -> Any:
    return value


# ----------------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class Option:
    """One option of `reluscope analyze`."""

    name: str  # the command's parameter; for analysis options also the AnalyzeConfig field and API keyword
    default: Any
    type: Any  # what the command line hands over (typer reads it)
    flags: tuple[str, ...]  # the long flag first: its name without the dashes is the config key
    help: str
    config: ConfigConverter | None  # config-file value -> command-line value; None: no config key
    analysis: bool = True  # a setting of the analysis (AnalyzeConfig field, reluscope.analyze keyword);
    # False: how the command line reports (format, files, gates, verbosity)
    field_type: Any = None  # the AnalyzeConfig field's type where it differs from `type`
    from_cli: Callable[[Any], Any] = _same  # command-line value -> AnalyzeConfig value
    from_api: Callable[[Any], Any] = _same  # reluscope.analyze keyword value -> AnalyzeConfig value
    metavar: str | None = None
    not_in_config: str | None = None  # why a config file must not set it; said when one tries
    # what it can do (run code, write a file), for a key that a config file found above the
    # repository root may not set (settings.py ignores it there, and says so)
    powerful: str | None = None
    diff: bool = False  # `reluscope diff` reads the same key from its own table

    @property
    def key(self) -> str:
        """The config-file key: the long flag without its dashes."""
        return self.flags[0].lstrip("-")


# Not a config-file key, on purpose: a reluscope.toml or pyproject.toml travels with a repository
# (and with a downloaded model), so a file could switch on unpickling, which runs whatever code the
# checkpoint holds, for everyone who runs reluscope in that folder. Allowing it stays a decision of
# the person who types each command.
TRUST_CHECKPOINT_NOT_IN_CONFIG = (
    "--trust-checkpoint is deliberately not a config key: it lets the checkpoint run code while it is "
    "unpickled, and a config file in a repository must not decide that for whoever runs reluscope there. "
    "Pass --trust-checkpoint on the command line, for files you trust")

# In the order of `reluscope analyze --help`.
ANALYZE_OPTIONS: tuple[Option, ...] = (
    Option("data", None, Optional[Path], ("--data", "-d"), "Calibration data: .npy, .npz (x/inputs, y/labels; or "
           "input_ids/attention_mask), .pt (tensor, tuple or dict), a folder of images, or texts for a Hugging Face "
           "model folder: .txt (one per line) or .jsonl (a \"text\" field).", _path, analysis=False),
    Option("arch", None, Optional[str], ("--arch",), "Architecture factory for a state_dict: FILE.py:FACTORY "
           "or package.module:FACTORY.", _arch, powerful="it runs Python code"),
    Option("input_shape", None, Optional[str], ("--input-shape",), "Per-sample input shape, e.g. 3,224,224: "
           "for synthetic data and for resizing image folders.", _shape,
           field_type=Optional[Tuple[int, ...]], from_cli=_shape_from_text, from_api=_shape_from_api),
    Option("normalize", "none", str, ("--normalize",), NORMALIZE_HELP, _str, field_type=Union[str, Normalize],
           from_cli=parse_normalize, from_api=parse_normalize, metavar="none|imagenet|MEAN,STD"),
    Option("batch_size", 64, int, ("--batch-size", "-b"), "Samples per forward pass.", _int),
    Option("max_samples", None, Optional[int], ("--max-samples", "-n"), "Analyse at most this many samples.",
           _int),
    Option("max_length", 128, int, ("--max-length",), "Text data: tokens per text at most (longer texts are "
           "truncated; each batch is padded to its longest text, and padding is not measured).", _int),
    Option("device", "auto", str, ("--device",), "auto, cpu, cuda or cuda:N.", _str),
    Option("output_format", OutputFormat.table, OutputFormat, ("--format", "-f"), "Payload format.", _format,
           analysis=False, diff=True),
    Option("output", None, Optional[Path], ("--output", "-o"), "Write the payload to FILE (atomically) "
           "instead of stdout.", None, analysis=False),
    Option("unit_axis", None, Optional[int], ("--unit-axis",), "Override the unit axis (per-sample, batch axis "
           "dropped; negative counts from the end).", _int),
    Option("rare_threshold", 0.01, float, ("--rare-threshold",), "Active share below which a unit is rarely "
           "active.", _float),
    Option("dormant_tau", 0.025, float, ("--dormant-tau",), "tau of the tau-dormant score for GELU/SiLU/ELU/"
           "LeakyReLU sites.", _float),
    Option("gradients", False, bool, ("--gradients",), "Also run backward passes and report gradient flow "
           "(PyTorch models).", _bool),
    Option("loss", None, Optional[str], ("--loss",), "Loss for --gradients: cross-entropy, predicted-class or "
           "half-squared-norm (default: chosen from the data and the output).", _str),
    Option("percentiles", False, bool, ("--percentiles",), "Also report p1/p50/p99/p99.9 of each site's outputs "
           "(streaming histogram, relative error <= 0.4%; costs extra passes).", _bool),
    Option("stats_kernel", "auto", str, ("--stats-kernel",), "How site statistics are computed: a one-pass "
           "Triton kernel or PyTorch reductions. auto: Triton on CUDA where the triton package is installed, "
           "PyTorch otherwise.", _str, metavar="auto|triton|torch"),  # see measure.stats.resolve_kernel
    Option("trust_checkpoint", False, bool, ("--trust-checkpoint",), "Allow unpickling code from the checkpoint "
           "(a whole pickled nn.Module, pickled objects in a .pt2 archive). Only for files you trust.", None,
           not_in_config=TRUST_CHECKPOINT_NOT_IN_CONFIG),
    Option("timeout", None, Optional[float], ("--timeout",), "Stop with exit 2 when the analysis (loading the "
           "model included) takes longer than SECONDS: for CI, against a model that never finishes. Ctrl-C "
           "stops any analysis within a second (exit 130).", None, analysis=False, metavar="SECONDS"),
    Option("html", None, Optional[Path], ("--html",), "Also write the report as one self-contained HTML page "
           "(charts by depth, unit strips, gates; opens offline). Needs the extra: pip install \"reluscope\\[html]\".",
           None, analysis=False, metavar="FILE"),
    Option("no_bars", False, bool, ("--no-bars",), "No zero/dead share bars in the terminal table (they are "
           "only drawn on a terminal).", None, analysis=False),
    Option("fail_on", None, Optional[List[str]], ("--fail-on",), FAIL_ON_HELP, _rules, analysis=False,
           metavar="RULE", diff=True),
    Option("junit", None, Optional[Path], ("--junit",), "Also write the gate results as JUnit XML (one test case "
           "per --fail-on rule).", _path, analysis=False, metavar="FILE", diff=True, powerful="it writes a file"),
    Option("config_file", None, Optional[Path], ("--config",), CONFIG_HELP, None, analysis=False, metavar="FILE"),
    Option("no_config", False, bool, ("--no-config",), "Ignore config files.", None, analysis=False),
    Option("quiet", False, bool, ("--quiet", "-q"), "No progress bar or summary on stderr.", None, analysis=False),
    Option("debug", False, bool, ("--debug",), "Show tracebacks.", None, analysis=False),
)

# The settings of one analysis: AnalyzeConfig's fields and the keywords of reluscope.analyze.
ANALYSIS_OPTIONS: tuple[Option, ...] = tuple(o for o in ANALYZE_OPTIONS if o.analysis)

# `reluscope prune`: the analysis options that choose the model, the data and how it is read, then its own.
_PRUNE_SHARED = ("data", "arch", "input_shape", "normalize", "batch_size", "max_samples", "max_length", "device",
                 "unit_axis", "rare_threshold", "trust_checkpoint")
_PRUNE_REPORTING = ("output_format", "timeout", "config_file", "no_config", "quiet", "debug")
_BY_NAME = {o.name: o for o in ANALYZE_OPTIONS}
PRUNE_OPTIONS: tuple[Option, ...] = (
    *(_BY_NAME[name] for name in _PRUNE_SHARED),
    Option("output", None, Optional[Path], ("--output", "-o"), "Write the pruned model to FILE, atomically and "
           "only when the verification passes: .pt (the pruned state_dict; `reluscope analyze` with the same --arch "
           "resizes the layers to it), .pt2 (torch.export) or .onnx. The suffix sets the format.", None, analysis=False),
    Option("report", None, Optional[Path], ("--report",), "Write the prune report (in --format) to FILE instead "
           "of stdout.", None, analysis=False, metavar="FILE"),
    Option("tolerance", 1e-5, float, ("--tolerance",), "Largest output difference accepted, relative to the output "
           "scale (max |original - pruned| / max |original| on the calibration data); above it: exit 1, no model "
           "written.", None, analysis=False),
    Option("sites", None, Optional[List[str]], ("--sites",), "Prune only at sites whose name matches GLOB "
           "(fnmatch; repeatable). Units coupled to a site left out stay.", None, analysis=False, metavar="GLOB"),
    Option("include_rarely_active", False, bool, ("--include-rarely-active",), "Also remove rarely active units "
           "(not exact: each group of them stays unless the outputs stay within --tolerance).", None,
           analysis=False),
    Option("dry_run", False, bool, ("--dry-run",), "Report what would be removed; write no model.", None,
           analysis=False),
    *(_BY_NAME[name] for name in _PRUNE_REPORTING),
)
