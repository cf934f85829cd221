"""What analysing an ONNX model costs next to plain onnxruntime inference on the same batches.

    python benchmarks/onnx_overhead.py [--images 64] [--batch 16] [--repeats 5]

exports a ResNet-18-style CNN (8 residual blocks, 64x64 inputs) and prints the ratios. Runs are
interleaved (plain, reluscope, plain, ...) and medians reported: timings on shared machines drift
by tens of percent between runs. Two ratios: end to end (model loading and session creation
included on both sides), and steady state (batches after the first, which reluscope reads through
its exact route while creating the sites).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _plain(onnx_path: Path, batches: list[np.ndarray]) -> tuple[float, float, float]:
    """(session creation + all runs, all runs, runs after the first) in seconds, default session options."""
    import onnxruntime as ort

    started = time.perf_counter()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ready = time.perf_counter()
    marks = []
    for batch in batches:
        session.run(None, {name: batch})
        marks.append(time.perf_counter())
    return marks[-1] - started, marks[-1] - ready, marks[-1] - marks[0]


def _reluscope(onnx_path: Path, batches: list[np.ndarray]) -> tuple[float, float]:
    """(end to end, runs after the first) in seconds for reluscope.analyze."""
    import reluscope

    marks: list[float] = []
    started = time.perf_counter()
    reluscope.analyze(onnx_path, iter(batches), progress=lambda _: marks.append(time.perf_counter()))
    return time.perf_counter() - started, marks[-1] - marks[0]


def measure_onnx(onnx_path: str | Path, batches: list[np.ndarray], repeats: int = 3) -> dict[str, Any]:
    """Median times of plain onnxruntime and of reluscope.analyze on `batches`, interleaved, and their ratios."""
    onnx_path = Path(onnx_path)
    _plain(onnx_path, batches[:1])  # warm both paths (imports, page cache)
    _reluscope(onnx_path, batches[:1])
    plain, plain_runs, plain_steady, ours, ours_steady = [], [], [], [], []
    for _ in range(repeats):
        total, runs, steady = _plain(onnx_path, batches)
        plain.append(total)
        plain_runs.append(runs)
        plain_steady.append(steady)
        total, steady = _reluscope(onnx_path, batches)
        ours.append(total)
        ours_steady.append(steady)
    median = statistics.median
    result = {
        "batches": len(batches),
        "samples": sum(len(b) for b in batches),
        "plain_s": median(plain),
        "plain_runs_s": median(plain_runs),
        "reluscope_s": median(ours),
        "ratio": median(o / p for o, p in zip(ours, plain)),
        "ratio_to_runs_only": median(o / p for o, p in zip(ours, plain_runs)),
    }
    if len(batches) > 1:
        result["steady_ratio"] = median(o / p for o, p in zip(ours_steady, plain_steady))
    return result


def _resnet_onnx(folder: Path, batch: int) -> Path:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
            blocks, cin = [], widths[0]
            for stage, width in enumerate(widths):
                blocks += [Block(cin, width, 1 if stage == 0 else 2), Block(width, width, 1)]
                cin = width
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    path = folder / "resnet.onnx"
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ResNet().eval(), (torch.randn(batch, 3, 64, 64),), str(path), dynamo=True,
                          external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    images = np.random.default_rng(0).normal(size=(args.images, 3, 64, 64)).astype(np.float32)
    batches = [images[i:i + args.batch] for i in range(0, args.images, args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        result = measure_onnx(_resnet_onnx(Path(folder), args.batch), batches, repeats=args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
