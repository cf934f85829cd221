"""What does an analysis cost compared with just running the model?

Measures `reluscope.analyze` (capture + per-site statistics + report) against a bare forward pass
over the same batches, on a ResNet-18-like network defined here (BasicBlocks whose one
`nn.ReLU(inplace=True)` is called twice per block: 17 activation sites). The two are timed in
interleaved repeats, alternating which goes first, because timings on a shared machine drift by
tens of percent between runs; the median of the per-repeat ratios is the headline number.

If benchmarks/onnx_overhead.py is present, the same network is also exported to ONNX and its
`measure_onnx(onnx_path, batches, repeats)` reports the ONNX backend's overhead.

    python benchmarks/overhead.py                      # CPU, 64 images 3x112x112, batches of 16
    python benchmarks/overhead.py --size 224           # the ImageNet resolution (about 4x slower)
    python benchmarks/overhead.py --device cuda --model resnet50 --images 1024 --batch-size 128 --size 224

On CUDA both statistics routes are measured by default (`--stats-kernel both`): the plain
PyTorch reductions ("before") and the one-pass Triton kernel ("after").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import reluscope


# ----------------------------------------------------------------------------- the model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # called twice per forward: relu#0, relu#1
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Like(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(seed: int = 0, name: str = "resnet18-like") -> nn.Module:
    torch.manual_seed(seed)
    if name == "resnet50":  # torchvision's, random weights (nothing is downloaded)
        from torchvision.models import resnet50

        model = resnet50(weights=None).eval()
    else:
        model = ResNet18Like().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in a trained network
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def make_batches(images: int, batch_size: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(images, 3, size, size, generator=generator)
    return [data[i:i + batch_size].clone() for i in range(0, images, batch_size)]


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device) -> float:
    """Seconds for a plain forward pass over all batches (the baseline: no capture, no statistics)."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch)
    _sync(device)
    return time.perf_counter() - start


def analysis(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device,
             stats_kernel: str = "auto") -> tuple[float, Any]:
    """Seconds for reluscope.analyze over the same batches, report built (its one host transfer) included."""
    _sync(device)
    start = time.perf_counter()
    report = reluscope.analyze(model, list(batches), batch_size=len(batches[0]), device=str(device),
                               stats_kernel=stats_kernel)
    _sync(device)
    return time.perf_counter() - start, report


def interleaved(first: Callable[[], float], second: Callable[[], float], repeats: int) -> tuple[list[float], list[float]]:
    """Run the two measurements alternately, swapping which goes first each repeat."""
    a_times, b_times = [], []
    for r in range(repeats):
        if r % 2 == 0:
            a_times.append(first())
            b_times.append(second())
        else:
            b_times.append(second())
            a_times.append(first())
    return a_times, b_times


def measure_torch(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, repeats: int,
                  warmup: int = 1, stats_kernel: str = "auto") -> dict[str, Any]:
    """Median bare and analysis times, per-repeat ratios and the report of the last analysis.
    The warm-up analysis also compiles the Triton kernel (cached on disk for later runs)."""
    last: dict[str, Any] = {}

    def run_analysis() -> float:
        seconds, last["report"] = analysis(model, batches, device, stats_kernel)
        return seconds

    def run_bare() -> float:
        return bare_forward(model, batches, device)

    for _ in range(warmup):
        run_bare()
        run_analysis()
    bare, full = interleaved(run_bare, run_analysis, repeats)
    ratios = [f / b for f, b in zip(full, bare)]
    return {"bare_s": statistics.median(bare), "analysis_s": statistics.median(full),
            "ratio": statistics.median(ratios), "ratios": ratios, "best_ratio": min(full) / min(bare),
            "report": last["report"]}


# ----------------------------------------------------------------------------- ONNX (optional)
def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The same network as a self-contained ONNX file (dynamo exporter, weights inside), quietly."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={"x": {0: batch}}, input_names=["input"], output_names=["logits"])
    return path


def load_onnx_section() -> Any | None:
    """benchmarks/onnx_overhead.py's module, or None when it is not there (or cannot be imported)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module("onnx_overhead")
    except ModuleNotFoundError as exc:
        if exc.name != "onnx_overhead":
            print(f"ONNX section skipped: onnx_overhead needs {exc.name}, which is not installed")
        return None


def _onnx_ratio(result: Any) -> tuple[float | None, str]:
    """measure_onnx's answer as (ratio, printable details), whatever shape it comes in."""
    if isinstance(result, (int, float)):
        return float(result), ""
    if isinstance(result, dict):
        ratio = result.get("ratio")
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                            if k != "ratio" and isinstance(v, (int, float, str)))
        return (float(ratio) if ratio is not None else None), details
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(v, (int, float)) for v in result):
        bare, full = result
        return full / bare, f"bare {bare * 1e3:.1f} ms, analysis {full * 1e3:.1f} ms"
    return None, repr(result)


def run_onnx_section(model: nn.Module, batches: Sequence[torch.Tensor], repeats: int) -> float | None:
    section = load_onnx_section()
    if section is None or not hasattr(section, "measure_onnx"):
        print("ONNX section skipped: benchmarks/onnx_overhead.py (measure_onnx) is not available")
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model.cpu(), batches[0][:2].cpu().clone(), Path(folder) / "resnet18_like.onnx")
        arrays = [b.detach().cpu().numpy() for b in batches]  # onnxruntime takes numpy arrays
        ratio, details = _onnx_ratio(section.measure_onnx(path, arrays, repeats))
    if ratio is None:
        print(f"ONNX: measure_onnx returned {details}")
    else:
        print(f"ONNX backend: analysis / bare onnxruntime = {ratio:.2f}x" + (f"  ({details})" if details else ""))
    return ratio


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (skipped when no GPU is available)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=112, help="image height and width")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX section")
    parser.add_argument("--model", choices=("resnet18-like", "resnet50"), default="resnet18-like",
                        help="resnet50 needs torchvision")
    parser.add_argument("--stats-kernel", choices=("auto", "triton", "torch", "both"), default=None,
                        help="statistics route(s) to time (default: both on CUDA, auto on the CPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda asked for, but no CUDA GPU is available here")
        return 0
    model = build_model(name=args.model).to(device)
    batches = [b.to(device) for b in make_batches(args.images, args.batch_size, args.size)]
    kernels = args.stats_kernel or ("both" if device.type == "cuda" else "auto")
    print(f"{args.model}, {args.images} images 3x{args.size}x{args.size} in batches of {args.batch_size}, "
          f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                         f" ({torch.get_num_threads()} threads)") + f", {args.repeats} interleaved repeats")
    for kernel in ("torch", "triton") if kernels == "both" else (kernels,):
        result = measure_torch(model, batches, device, args.repeats, stats_kernel=kernel)
        report = result["report"]
        print(f"  statistics route: {report.run['stats_kernel']} (--stats-kernel {kernel})")
        print(f"  bare forward (inference_mode): {result['bare_s'] * 1e3:8.1f} ms   (median)")
        print(f"  reluscope.analyze:             {result['analysis_s'] * 1e3:8.1f} ms   (median; "
              f"{len(report.layers)} sites, {report.data['samples']} samples)")
        print(f"  per-repeat ratios: {' '.join(f'{r:.2f}' for r in result['ratios'])}; "
              f"best analysis / best bare: {result['best_ratio']:.2f}x")
        print(f"torch backend ({report.run['stats_kernel']} statistics): analysis / bare forward = "
              f"{result['ratio']:.2f}x (median of interleaved repeats)")
    if not args.no_onnx:
        run_onnx_section(model, batches, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
