"""The statistics of one activation tensor: Triton kernel vs PyTorch route vs one plain read.

For each activation shape of a ResNet-50 at batch 128 (fp32, NCHW), times
  read    `x.sum()`: one pass over the tensor, the floor any statistics pass can reach
  triton  `triton_stats.accumulate` (one launch, everything SiteStats keeps)
  torch   `TorchReduction.update` (the plain PyTorch reductions, deferred NaN check as on CUDA)
and prints each as GB/s and as a ratio to the read. CUDA only: on the CPU the kernel would
run in Triton's interpreter, which says nothing about speed (benchmarks/overhead.py covers the
CPU end to end).

    python benchmarks/stats_kernel.py                 # batch 128
    python benchmarks/stats_kernel.py --batch 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

from reluscope.measure.sites import Activation
from reluscope.measure.reductions import NonfinitePolicy, TorchReduction
from reluscope.measure.stats import SiteStats

# (channels, height, width) of the ReLU outputs of torchvision's ResNet-50 at 224x224, one per
# distinct shape, with how many sites have it.
RESNET50_SITES = [((64, 112, 112), 1), ((64, 56, 56), 6), ((256, 56, 56), 3), ((128, 56, 56), 1),
                  ((128, 28, 28), 7), ((512, 28, 28), 4), ((256, 28, 28), 1), ((256, 14, 14), 11),
                  ((1024, 14, 14), 6), ((512, 14, 14), 1), ((512, 7, 7), 5), ((2048, 7, 7), 3)]


def cuda_ms(fn: Callable[[], object], repeats: int = 50) -> float:
    """Median milliseconds of `fn` on the GPU (CUDA events, after a warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: this benchmark times the CUDA kernel and no CUDA GPU is available here")
        return 0
    from reluscope.backends.torch import triton_kernel as triton_stats

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    relu = Activation("relu", hard_zero=True)
    print(f"{torch.cuda.get_device_name(device)}, batch {args.batch}, {args.dtype}")
    print(f"{'shape':>18} {'sites':>5} {'MB':>7} {'read GB/s':>10} {'triton':>8} {'torch':>8}   (x the read)")
    totals = {"read": 0.0, "triton": 0.0, "torch": 0.0}
    for (channels, height, width), sites in RESNET50_SITES:
        x = torch.randn(args.batch, channels, height, width, device=device, dtype=dtype).relu_()
        stats = SiteStats(relu, tuple(x.shape[1:]), 0, device)
        torch_route = TorchReduction(NonfinitePolicy.DEFER)
        ms = {
            "read": cuda_ms(lambda: x.sum()),
            "triton": cuda_ms(lambda: triton_stats.accumulate(stats, x, 1)),
            "torch": cuda_ms(lambda: torch_route.update(stats, x.float(), None, 1)),
        }
        for key in totals:
            totals[key] += ms[key] * sites
        megabytes = x.numel() * x.element_size() / 1e6
        print(f"{tuple(x.shape)!s:>18} {sites:>5} {megabytes:>7.0f} {megabytes / ms['read']:>10.0f} "
              f"{ms['triton'] / ms['read']:>7.2f}x {ms['torch'] / ms['read']:>7.2f}x")
    print(f"all {sum(s for _, s in RESNET50_SITES)} sites: read {totals['read']:.2f} ms, triton {totals['triton']:.2f} ms "
          f"({totals['triton'] / totals['read']:.2f}x), torch {totals['torch']:.2f} ms "
          f"({totals['torch'] / totals['read']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
