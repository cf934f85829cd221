"""Peak memory does not grow with the number of batches: 4 vs 32 batches, each in a fresh process.

Batches come from a generator, so the calibration data itself is never all in memory; what
could grow is what the analysis keeps per batch. On the CPU the figure is the process's peak
resident set (ru_maxrss); on CUDA, torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/memory.py [--device cuda] [--size 112] [--batch-size 16]
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


def child(batches: int, batch_size: int, size: int, device: str, gradients: bool) -> dict[str, float]:
    import torch

    sys.path.insert(0, str(HERE))
    import reluscope
    from overhead import build_model

    dev = torch.device(device)
    model = build_model().to(dev)

    def stream():
        generator = torch.Generator().manual_seed(0)
        for _ in range(batches):
            x = torch.randn(batch_size, 3, size, size, generator=generator)
            yield (x, torch.randint(0, 1000, (batch_size,), generator=generator)) if gradients else x

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    report = reluscope.analyze(model, stream(), batch_size=batch_size, device=device, gradients=gradients)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batches": batches, "samples": report.data["samples"], "peak_bytes": peak}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gradients", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size, args.size, args.device, args.gradients)))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("cuda: skipped (no GPU)")
            return 0
    results = []
    for batches in (4, 32):
        command = [sys.executable, __file__, "--child", str(batches), "--device", args.device, "--size",
                   str(args.size), "--batch-size", str(args.batch_size)] + (["--gradients"] if args.gradients else [])
        results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    what = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    for r in results:
        print(f"  {r['batches']:3d} batches ({r['samples']:5d} samples): {what} {r['peak_bytes'] / 2**20:8.1f} MiB")
    ratio = results[1]["peak_bytes"] / results[0]["peak_bytes"]
    print(f"memory: peak(32 batches) / peak(4 batches) = {ratio:.3f}  (1.0 means no growth with batches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
