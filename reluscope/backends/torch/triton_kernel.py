"""Site statistics in one read of the activation: a Triton kernel for CUDA.

The PyTorch route (`measure.reductions.TorchReduction`) runs about fifteen separate reductions per
site and batch, each a pass over the activation and a kernel launch; on a GPU, where a forward
pass is itself bandwidth-bound, each extra pass shows (figures: benchmarks/README.md). This kernel
reads each element once and folds everything `SiteStats` keeps into its accumulators:
per-unit active counts and |y| sums, saturated and NaN/Inf counts, min and max over finite
outputs, and float64 sum and sum of squares. One launch per site and batch; results go
straight into the accumulators with atomics, so nothing is read back to the host.

NaN/Inf are masked in the same pass (they count as non-finite and add nothing else), so this
route never needs the deferred re-measure that the PyTorch route relies on for speed.

This module imports triton at the top; `routes.py` imports it lazily and only where it is used.
With TRITON_INTERPRET=1 set before the import, the same kernel runs on CPU tensors in
Triton's interpreter: that is how the tests check it against the PyTorch route without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from ...measure.stats import SiteStats

# Elements per tile: 1024 per program and step (8 per thread at 4 warps), the usual size for
# a bandwidth-bound reduction. Chosen from first principles, not yet tuned on hardware.
TILE = 1024
NUM_WARPS = 4
# Contiguous elements a tile should span at least, so that loads coalesce when a unit's
# elements come in short runs (a 7x7 feature map) or one at a time (units on the last axis).
MIN_SPAN = 128
PROGRAMS_PER_SM = 8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_tile(x_ptr, tile, in_program, outer, units, inner, inner_chunks, rows, unit, unit_ok, lanes,
               ROWS: tl.constexpr, INNER_BLOCK: tl.constexpr):
    """One tile of the (outer, units, inner) view as float32, and which of its lanes are real."""
    if INNER_BLOCK == 1:
        # Units on the last axis (inner == 1, one chunk per row tile). Said at compile time so
        # that the offsets are provably aligned and loads vectorise along the units.
        row = tile * ROWS + rows
        inner_idx = lanes
    else:
        row = (tile // inner_chunks) * ROWS + rows
        inner_idx = (tile % inner_chunks) * INNER_BLOCK + lanes
    # A tile past the program's run (it belongs to the next program) or past the tensor's end
    # (then its first row is >= outer) is masked off.
    valid = (row < outer) & unit_ok & (inner_idx < inner) & (rows * 0 + in_program > 0)
    offsets = (row.to(tl.int64) * units + unit) * inner + inner_idx
    return tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32), valid


@triton.jit
def _fold(x, valid, active, abs_sum, saturated, nonfinite, low, high, total, squares, upper,
          HAS_ABS: tl.constexpr, HAS_UPPER: tl.constexpr):
    """Add one tile to the per-lane accumulators."""
    finite = valid & (tl.abs(x) < float("inf"))  # false for NaN too
    nonfinite += (valid & (finite == 0)).to(tl.int32)
    clean = tl.where(finite, x, 0.0)  # zero is inactive under every definition
    active += (valid & (x > 0)).to(tl.int32)  # +Inf is active; NaN > 0 is false
    clean64 = clean.to(tl.float64)
    if HAS_ABS:
        abs_sum += tl.abs(clean64)
    if HAS_UPPER:
        saturated += (valid & (clean >= upper)).to(tl.int32)
    low = tl.minimum(low, tl.where(finite, x, float("inf")))
    high = tl.maximum(high, tl.where(finite, x, float("-inf")))
    total += clean64
    squares += clean64 * clean64
    return active, abs_sum, saturated, nonfinite, low, high, total, squares


# The loop bounds change with every batch shape; specialising on them would compile a kernel
# per shape. `units` and `inner` stay specialised: their divisibility lets loads vectorise.
@triton.jit(do_not_specialize=["outer", "inner_chunks", "tiles_per_program", "upper"])
def _site_stats_kernel(
    x_ptr, active_ptr, abs_ptr, saturated_ptr, nonfinite_ptr, min_ptr, max_ptr, sum_ptr, sumsq_ptr,
    outer, units, inner, inner_chunks, tiles_per_program, upper,
    ROWS: tl.constexpr, UNIT_BLOCK: tl.constexpr, INNER_BLOCK: tl.constexpr,
    HAS_ABS: tl.constexpr, HAS_UPPER: tl.constexpr,
):
    # The activation is viewed as (outer, units, inner), inner contiguous. A program owns
    # UNIT_BLOCK units and a run of tiles_per_program tiles of shape (ROWS, UNIT_BLOCK,
    # INNER_BLOCK) along their (outer, inner) extent.
    unit_block = tl.program_id(0)
    first = tl.program_id(1) * tiles_per_program
    rows = tl.arange(0, ROWS)[:, None, None]
    unit_ids = unit_block * UNIT_BLOCK + tl.arange(0, UNIT_BLOCK)
    unit = unit_ids[None, :, None]
    lanes = tl.arange(0, INNER_BLOCK)[None, None, :]
    unit_ok = unit < units

    active = tl.zeros([ROWS, UNIT_BLOCK, INNER_BLOCK], dtype=tl.int32)
    abs_sum = tl.zeros([ROWS, UNIT_BLOCK, INNER_BLOCK], dtype=tl.float64)
    saturated = tl.zeros([ROWS, UNIT_BLOCK, INNER_BLOCK], dtype=tl.int32)
    nonfinite = tl.zeros([ROWS, UNIT_BLOCK, INNER_BLOCK], dtype=tl.int32)
    low = tl.full([ROWS, UNIT_BLOCK, INNER_BLOCK], float("inf"), dtype=tl.float32)
    high = tl.full([ROWS, UNIT_BLOCK, INNER_BLOCK], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS, UNIT_BLOCK, INNER_BLOCK], dtype=tl.float64)
    squares = tl.zeros([ROWS, UNIT_BLOCK, INNER_BLOCK], dtype=tl.float64)

    # Two tiles per step, both loads issued before either is folded in: twice the bytes in
    # flight per thread for the same accumulator registers (the kernel is bandwidth-bound and
    # its float64 accumulators limit how many threads fit on an SM).
    for step in range(0, tiles_per_program, 2):
        xa, va = _load_tile(x_ptr, first + step, 1, outer, units, inner, inner_chunks, rows, unit, unit_ok, lanes,
                            ROWS, INNER_BLOCK)
        xb, vb = _load_tile(x_ptr, first + step + 1, step + 1 < tiles_per_program, outer, units, inner,
                            inner_chunks, rows, unit, unit_ok, lanes, ROWS, INNER_BLOCK)
        active, abs_sum, saturated, nonfinite, low, high, total, squares = _fold(
            xa, va, active, abs_sum, saturated, nonfinite, low, high, total, squares, upper, HAS_ABS, HAS_UPPER)
        active, abs_sum, saturated, nonfinite, low, high, total, squares = _fold(
            xb, vb, active, abs_sum, saturated, nonfinite, low, high, total, squares, upper, HAS_ABS, HAS_UPPER)

    unit_mask = unit_ids < units
    per_unit_active = tl.sum(tl.sum(active.to(tl.int64), axis=2), axis=0)
    tl.atomic_add(active_ptr + unit_ids, per_unit_active, mask=unit_mask)
    if HAS_ABS:
        tl.atomic_add(abs_ptr + unit_ids, tl.sum(tl.sum(abs_sum, axis=2), axis=0), mask=unit_mask)
    if HAS_UPPER:
        tl.atomic_add(saturated_ptr, tl.sum(tl.sum(tl.sum(saturated.to(tl.int64), axis=2), axis=1), axis=0))
    tl.atomic_add(nonfinite_ptr, tl.sum(tl.sum(tl.sum(nonfinite.to(tl.int64), axis=2), axis=1), axis=0))
    tl.atomic_min(min_ptr, tl.min(tl.min(tl.min(low, axis=2), axis=1), axis=0))
    tl.atomic_max(max_ptr, tl.max(tl.max(tl.max(high, axis=2), axis=1), axis=0))
    tl.atomic_add(sum_ptr, tl.sum(tl.sum(tl.sum(total, axis=2), axis=1), axis=0))
    tl.atomic_add(sumsq_ptr, tl.sum(tl.sum(tl.sum(squares, axis=2), axis=1), axis=0))


def usable_on(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device` in this process."""
    if INTERPRETED:
        return True
    return torch.device(device).type == "cuda"


def layout(y: torch.Tensor, unit_dim: int | None) -> tuple[torch.Tensor, int, int, int] | None:
    """(tensor, outer, units, inner) such that the tensor's memory is a contiguous
    (outer, units, inner) array; None where the kernel does not apply (the caller falls back)."""
    if y.dtype not in SUPPORTED_DTYPES or y.numel() == 0:
        return None
    if unit_dim is None:
        return (y, 1, 1, y.numel()) if y.is_contiguous() else None
    units = y.shape[unit_dim]
    if y.is_contiguous():
        return y, math.prod(y.shape[:unit_dim]), units, math.prod(y.shape[unit_dim + 1:])
    unit_last = y.movedim(unit_dim, -1)  # channels_last tensors are contiguous this way round
    if unit_last.is_contiguous():
        return unit_last, y.numel() // units, units, 1
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tile_shape(units: int, inner: int) -> tuple[int, int, int]:
    """(ROWS, UNIT_BLOCK, INNER_BLOCK) with ROWS * UNIT_BLOCK * INNER_BLOCK == TILE."""
    inner_block = min(_next_pow2(inner), TILE)
    unit_block = min(_next_pow2(units), max(1, MIN_SPAN // inner_block))
    return TILE // (unit_block * inner_block), unit_block, inner_block


@functools.cache
def _target_programs(device_index: int | None) -> int:
    if INTERPRETED or device_index is None:
        return 4  # the interpreter runs programs one after another: few and large is fastest
    return torch.cuda.get_device_properties(device_index).multi_processor_count * PROGRAMS_PER_SM


# The kernel writes every state of SiteStats but these, in the order the table declares them: the
# histogram is a separate bincount, and the kernel masks NaN/Inf itself, so nothing is deferred.
NOT_WRITTEN = ("hist", "poisoned")


def state_pointers(stats: SiteStats) -> list[torch.Tensor]:
    """The kernel's accumulator arguments, from SiteStats' declared states (a state the site does
    not keep, |y| sums, gets a stand-in the kernel never writes: HAS_ABS is off)."""
    stand_in = stats.sum
    return [stand_in if getattr(stats, state.name) is None else getattr(stats, state.name)
            for state in stats.STATES if state.name not in NOT_WRITTEN]


def accumulate(stats: SiteStats, y: torch.Tensor, unit_dim: int | None, *,
               target_programs: int | None = None) -> bool:
    """Fold one batch into `stats` with one kernel launch; False (nothing done) where the
    layout or dtype is not supported, so the caller takes the PyTorch route instead."""
    found = layout(y, unit_dim)
    if found is None:
        return False
    x, outer, units, inner = found
    rows, unit_block, inner_block = tile_shape(units, inner)
    unit_blocks = triton.cdiv(units, unit_block)
    inner_chunks = triton.cdiv(inner, inner_block)
    tiles_per_unit = triton.cdiv(outer, rows) * inner_chunks
    if target_programs is None:
        target_programs = _target_programs(x.device.index if x.is_cuda else None)
    splits = max(1, min(triton.cdiv(target_programs, unit_blocks), tiles_per_unit, 65535))
    tiles_per_program = triton.cdiv(tiles_per_unit, splits)
    splits = triton.cdiv(tiles_per_unit, tiles_per_program)
    upper = stats.activation.upper
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _site_stats_kernel[(unit_blocks, splits)](
            x, *state_pointers(stats),
            outer, units, inner, inner_chunks, tiles_per_program, float(upper or 0.0),
            ROWS=rows, UNIT_BLOCK=unit_block, INNER_BLOCK=inner_block,
            HAS_ABS=stats.abs_sum is not None, HAS_UPPER=upper is not None, num_warps=NUM_WARPS,
        )
    return True


@functools.cache
def self_check(device: torch.device) -> str | None:
    """Run the kernel on two small batches that exercise every statistic and both tile layouts,
    and compare it with the PyTorch route: None when they agree, else one line saying what went
    wrong. A GPU the kernel cannot compile for, or a compiler that miscompiles it, then costs a
    warning and the PyTorch route instead of a crash or wrong numbers. Cached per device."""
    from ...measure.sites import Activation

    generator = torch.Generator().manual_seed(0)
    maps = (4 * torch.randn(3, 5, 6, 7, generator=generator)).clamp(-1, 6)  # units on axis 1 of NCHW
    maps[0, 1, 2, 3], maps[1, 4, 0, 0], maps[2, 0, 5, 6] = float("nan"), float("inf"), float("-inf")
    features = torch.randn(9, 40, generator=generator).relu()  # units on the last axis
    features[4, 7] = float("nan")
    checks = [(Activation("self-check", hard_zero=False, upper=6.0), maps),  # |y| sums and saturation too
              (Activation("relu", hard_zero=True), features)]
    try:
        for activation, y in checks:
            wrong = _disagreements(activation, y.to(device))
            if wrong:
                return f"the Triton statistics kernel disagreed with PyTorch on {device} ({', '.join(wrong)})"
    except Exception as exc:  # noqa: BLE001 - any failure to compile or launch means "not usable here"
        from ...errors import first_line

        return f"the Triton statistics kernel failed on {device}: {type(exc).__name__}: {first_line(exc)[:200]}"
    return None


def _disagreements(activation: Any, y: torch.Tensor) -> list[str]:
    """Statistics of one batch where the kernel and the NaN-safe PyTorch route differ."""
    from ...measure.reductions import NonfinitePolicy, TorchReduction
    from ...measure.stats import SiteStats

    fused = SiteStats(activation, tuple(y.shape[1:]), 0, y.device)  # accumulators only, filled by the kernel
    reference = SiteStats(activation, tuple(y.shape[1:]), 0, y.device,
                          reduction=TorchReduction(NonfinitePolicy.MASKED))
    reference.update(y)
    accumulate(fused, y, 1, target_programs=4)
    fused.samples, fused.elements = reference.samples, reference.elements
    got, want = fused.to_host(), reference.to_host()
    wrong = [key for key in ("active", "saturated", "nonfinite", "min", "max") if got[key] != want[key]]
    return wrong + [key for key in ("sum", "sumsq", "abs_sum") if not _close(got[key], want[key])]


def _close(got: Any, want: Any) -> bool:
    if got is None or want is None:
        return got is want
    pairs = zip(got, want) if isinstance(got, list) and isinstance(want, list) else [(got, want)]
    return all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in pairs)
