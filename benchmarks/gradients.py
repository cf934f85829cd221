"""Cost of --gradients: analysis-with-gradients time / plain forward+backward time, same batches.

The baseline is what a training step's gradient computation costs without reluscope:
forward, cross-entropy, `torch.autograd.grad` for every parameter. The analysis adds the
activation statistics, the per-site gradient hooks and the per-parameter norms.

    .venv/bin/python benchmarks/gradients.py [--device cuda] [--images 64] [--size 112]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reluscope  # noqa: E402
from overhead import _sync, build_model, interleaved, make_batches  # noqa: E402


def plain_forward_backward(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)
    _sync(device)
    return time.perf_counter() - start


def analysis_with_gradients(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    reluscope.analyze(model, list(batches), batch_size=len(batches[0][0]), device=str(device), gradients=True)
    _sync(device)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda: skipped (no GPU)")
        return 0
    model = build_model().to(device).eval()  # eval: BatchNorm uses running statistics, as in the analysis
    labels = torch.Generator().manual_seed(1)
    batches = [(x.to(device), torch.randint(0, 1000, (len(x),), generator=labels).to(device))
               for x in make_batches(args.images, args.batch_size, args.size)]
    plain_forward_backward(model, batches, device)
    analysis_with_gradients(model, batches, device)
    plain, full = interleaved(lambda: plain_forward_backward(model, batches, device),
                              lambda: analysis_with_gradients(model, batches, device), args.repeats)
    ratios = [f / p for f, p in zip(full, plain)]
    print(f"ResNet-18-like, {args.images} images 3x{args.size}x{args.size} in batches of {args.batch_size}, "
          f"{device}, {args.repeats} interleaved repeats")
    print(f"  plain forward+backward:        {1e3 * statistics.median(plain):8.1f} ms (median)")
    print(f"  reluscope.analyze(gradients):  {1e3 * statistics.median(full):8.1f} ms (median)")
    print(f"  per-repeat ratios: {' '.join(f'{r:.2f}' for r in ratios)}")
    print(f"gradients: analysis / plain forward+backward = {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
