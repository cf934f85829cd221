"""Peak memory does not grow with the number of batches: 4 vs 32 batches, each in a fresh process.

Batches come from a generator, so the calibration data itself is never all in memory; what
could grow is what the analysis keeps per batch. A third process runs the bare forward pass
over the same 4 batches: analysis peak / bare peak near 1 means the analysis holds no more than
the one batch of activations the forward pass itself needs. On the CPU the figure is the
process's peak resident set (ru_maxrss); on CUDA, torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/memory.py [--device cuda] [--model resnet50] [--size 112] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent


def child(batches: int, batch_size: int, size: int, device: str, gradients: bool, model_name: str,
          bare: bool) -> dict[str, float]:
    import torch

    sys.path.insert(0, str(HERE))
    import reluscope
    from overhead import build_model

    dev = torch.device(device)
    model = build_model(name=model_name).to(dev)

    def stream():
        generator = torch.Generator().manual_seed(0)
        for _ in range(batches):
            x = torch.randn(batch_size, 3, size, size, generator=generator)
            yield (x, torch.randint(0, 1000, (batch_size,), generator=generator)) if gradients else x

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if bare:
        samples = 0
        with torch.inference_mode():
            for x in stream():
                model(x.to(dev))
                samples += len(x)
    else:
        report = reluscope.analyze(model, stream(), batch_size=batch_size, device=device, gradients=gradients)
        samples = report.data["samples"]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batches": batches, "samples": samples, "peak_bytes": peak}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gradients", action="store_true")
    parser.add_argument("--model", choices=("resnet18-like", "resnet50"), default="resnet18-like",
                        help="resnet50 needs torchvision")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each configuration (median counts)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size, args.size, args.device, args.gradients, args.model,
                               args.bare)))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("cuda: skipped (no GPU)")
            return 0
    configs = ((4, False), (32, False), (4, True))
    # A process's peak RSS on the CPU varies by tens of MB between identical runs (allocator
    # arenas, thread pools): each configuration runs --repeats times, interleaved, and the
    # median peak counts.
    peaks: dict[tuple[int, bool], list[dict[str, float]]] = {config: [] for config in configs}
    for _ in range(args.repeats):
        for batches, bare in configs:
            command = [sys.executable, __file__, "--child", str(batches), "--device", args.device, "--size",
                       str(args.size), "--batch-size", str(args.batch_size), "--model", args.model]
            command += (["--gradients"] if args.gradients else []) + (["--bare"] if bare else [])
            peaks[(batches, bare)].append(json.loads(subprocess.run(command, check=True, capture_output=True,
                                                                    text=True).stdout))
    results = [sorted(runs, key=lambda r: r["peak_bytes"])[len(runs) // 2] for runs in peaks.values()]
    what = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    for r, label, runs in zip(results, ("analysis", "analysis", "bare forward"), peaks.values()):
        spread = ", ".join(f"{run['peak_bytes'] / 2**20:.0f}" for run in runs)
        print(f"  {label:12s} {r['batches']:3d} batches ({r['samples']:5d} samples): {what} "
              f"{r['peak_bytes'] / 2**20:8.1f} MiB  (median of {spread})")
    ratio = results[1]["peak_bytes"] / results[0]["peak_bytes"]
    print(f"memory: peak(32 batches) / peak(4 batches) = {ratio:.3f}  (1.0 means no growth with batches)")
    held = results[0]["peak_bytes"] / results[2]["peak_bytes"]
    print(f"memory: analysis peak / bare forward peak (4 batches) = {held:.3f}  "
          f"(near 1.0: no more than the forward pass's own batch of activations)"
          + ("  [with --gradients the analysis also runs backward]" if args.gradients else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
