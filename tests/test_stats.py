"""SiteStats: streaming accumulators that merge exactly, and NaN/Inf handling.

Expected values come from numpy on the same arrays.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reluscope
from reluscope.measure.sites import SiteInfo
from reluscope.report import Thresholds, build_layer
from reluscope.measure.sites import classify
from reluscope.measure.stats import SiteStats

ACTIVATIONS = {
    "relu": classify("relu"),
    "relu6": classify("hardtanh", (None, 0.0, 6.0)),
    "gelu": classify("gelu"),
    "prelu": classify("prelu"),
}
EXACT = ("elements", "samples", "active", "saturated", "nonfinite", "min", "max")
APPROX = ("sum", "sumsq")


def _activation_output(op: str, pre: torch.Tensor) -> torch.Tensor:
    if op == "relu":
        return torch.relu(pre)
    if op == "relu6":
        return torch.clamp(pre, 0.0, 6.0)
    if op == "gelu":
        return torch.nn.functional.gelu(pre)
    return torch.where(pre > 0, pre, 0.25 * pre)  # prelu


def _fresh(op: str, shape: tuple[int, ...], axis: int) -> SiteStats:
    return SiteStats(ACTIVATIONS[op], shape, axis, torch.device("cpu"))


def _feed(stats: SiteStats, op: str, pre: torch.Tensor) -> None:
    stats.update(_activation_output(op, pre), pre if ACTIVATIONS[op].active_from_input else None)


def _assert_same(a: dict, b: dict) -> None:
    for key in EXACT:
        assert a[key] == b[key], key
    for key in APPROX:  # each batch's sum is a float32 reduction: shards round differently
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    if a["abs_sum"] is None:
        assert b["abs_sum"] is None
    else:
        # per-unit |y| sums: float32 partial sums on the fast path, float64 on the NaN-safe one
        np.testing.assert_allclose(a["abs_sum"], b["abs_sum"], rtol=1e-6, atol=1e-6, equal_nan=True)


def _batch(rng: np.random.Generator, n: int, shape: tuple[int, ...], special: bool) -> torch.Tensor:
    values = rng.normal(0.0, 4.0, size=(n, *shape)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = 0.0  # exact zeros: the boundary of "active"
    if special:
        flat = values.reshape(-1)
        picks = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        flat[picks] = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)[: len(picks)]
    return torch.from_numpy(values)


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(sorted(ACTIVATIONS)),
    layout=st.sampled_from([((5,), 0), ((3, 4, 2), 0), ((2, 3, 4), 2)]),
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    split=st.integers(1, 3),
    special=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_of_updates_equals_update_of_union(op, layout, sizes, split, special, seed) -> None:
    """merge(update(a), update(b)) == update(a ∪ b), for any split of the batches into two shards."""
    shape, axis = layout
    rng = np.random.default_rng(seed)
    batches = [_batch(rng, n, shape, special and i == 0) for i, n in enumerate(sizes)]
    split = min(split, len(batches) - 1)
    left, right, union = _fresh(op, shape, axis), _fresh(op, shape, axis), _fresh(op, shape, axis)
    for b in batches[:split]:
        _feed(left, op, b)
    for b in batches[split:]:
        _feed(right, op, b)
    _feed(union, op, torch.cat(batches))
    left.merge(right)
    _assert_same(left.to_host(), union.to_host())


def test_merge_matches_numpy_counts() -> None:
    """The merged accumulator against counts computed directly with numpy."""
    rng = np.random.default_rng(7)
    a, b = _batch(rng, 5, (4, 3), False), _batch(rng, 9, (4, 3), False)
    left, right = _fresh("relu6", (4, 3), 0), _fresh("relu6", (4, 3), 0)
    _feed(left, "relu6", a)
    _feed(right, "relu6", b)
    left.merge(right)
    host = left.to_host()
    y = np.clip(np.concatenate([a.numpy(), b.numpy()]).astype(np.float64), 0.0, 6.0)
    assert host["active"] == (y > 0).sum(axis=(0, 2)).tolist()
    assert host["saturated"] == int((y >= 6.0).sum())
    assert host["elements"] == y.size and host["samples"] == 14
    assert (host["min"], host["max"]) == (float(y.min()), float(y.max()))
    assert host["sum"] == pytest.approx(y.sum(), rel=1e-6)
    assert host["sumsq"] == pytest.approx((y**2).sum(), rel=1e-6)


def test_merge_refuses_differently_shaped_sites() -> None:
    with pytest.raises(ValueError):
        _fresh("relu", (4,), 0).merge(_fresh("relu", (5,), 0))


# ----------------------------------------------------------------------------- NaN / Inf
def test_nonfinite_outputs_are_counted_and_ranges_stay_finite() -> None:
    y = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), -2.0, 0.0], [0.5, float("-inf"), 2.0]])
    stats = _fresh("gelu", (3,), 0)
    stats.update(y)
    stats.update(torch.tensor([[4.0, 5.0, -1.0]]))  # a clean batch after a dirty one
    host = stats.to_host()
    finite = np.array([1.0, 3.0, -2.0, 0.0, 0.5, 2.0, 4.0, 5.0, -1.0])
    assert host["nonfinite"] == 3
    assert (host["min"], host["max"]) == (finite.min(), finite.max())
    layer = build_layer(SiteInfo("s", "gelu", (3,), 0), host, Thresholds(), hard_zero=False, upper=None)
    assert layer["nonfinite"] == 3
    assert layer["mean"] == pytest.approx(finite.mean())
    assert layer["std"] == pytest.approx(finite.std())
    assert math.isfinite(layer["min"]) and math.isfinite(layer["max"])


def test_nonfinite_through_analyze_and_json() -> None:
    """NaN/Inf inputs reach a ReLU: counted in `nonfinite`, the JSON stays valid (no NaN tokens)."""
    x = torch.tensor([[1.0, -1.0, 2.0, 0.5],
                      [float("nan"), 3.0, -0.5, 0.25],
                      [float("inf"), float("-inf"), 1.5, -2.0]])
    report = reluscope.analyze(nn.Sequential(nn.ReLU()), x)
    layer = report.layer("0")
    y = np.maximum(x.numpy().astype(np.float64), 0.0)  # numpy: max(nan, 0) is nan, max(-inf, 0) is 0
    finite = y[np.isfinite(y)]
    assert layer["nonfinite"] == int((~np.isfinite(y)).sum()) == 2
    assert (layer["min"], layer["max"]) == (finite.min(), finite.max())
    assert layer["mean"] == pytest.approx(finite.mean())
    assert report.summary["nonfinite"] == 2
    assert "NaN" not in report.to_json() and "Infinity" not in report.to_json()


def test_nan_output_is_not_active() -> None:
    stats = _fresh("relu", (2,), 0)
    stats.update(torch.tensor([[float("nan"), 1.0], [float("nan"), 2.0]]))
    layer = build_layer(SiteInfo("s", "relu", (2,), 0), stats.to_host(), Thresholds(), hard_zero=True, upper=None)
    assert layer["dead_units"] == [0]  # unit 0 never produced an output > 0


@pytest.mark.parametrize("policy", ["check", "masked", "defer"])
@pytest.mark.parametrize("op", ["relu", "gelu"])
def test_positive_infinity_is_active(op: str, policy: str) -> None:
    """+Inf is > 0: a unit whose only positive outputs are +Inf is alive, and counted in `nonfinite`."""
    from reluscope.measure.reductions import NonfinitePolicy, TorchReduction

    y = torch.tensor([[float("inf"), 0.0, 1.0], [0.0, float("nan"), 2.0], [0.0, 0.0, 3.0]])
    stats = SiteStats(ACTIVATIONS[op], (3,), 0, torch.device("cpu"),
                      reduction=TorchReduction(NonfinitePolicy(policy)))
    stats.update(y)
    host = stats.to_host()
    if policy == "defer":  # the fast pass only raises the flag; the run measures again NaN-safely
        assert bool(stats.poisoned)
        return
    assert host["active"] == [1, 0, 3] and host["nonfinite"] == 2
    layer = build_layer(SiteInfo("s", op, (3,), 0), host, Thresholds(), hard_zero=op == "relu", upper=None)
    assert layer["dead_units"] == [1]


def test_positive_infinity_is_active_through_analyze() -> None:
    x = torch.tensor([[float("inf"), -1.0], [-1.0, 1.0], [-2.0, 2.0]])
    layer = reluscope.analyze(nn.Sequential(nn.ReLU()), x).layer("0")
    assert layer["dead_units"] == [] and layer["nonfinite"] == 1


def test_one_nan_does_not_hide_dormant_units() -> None:
    stats = _fresh("gelu", (3,), 0)
    stats.update(torch.tensor([[float("nan"), 1e-5, 1.0], [1.0, 1e-5, 2.0], [2.0, 1e-5, 1.0]]))
    layer = build_layer(SiteInfo("s", "gelu", (3,), 0), stats.to_host(), Thresholds(), hard_zero=False, upper=None)
    assert layer["dormant_units"] == [1]


def test_update_does_not_keep_the_tensor() -> None:
    """In-place activations hand over an object that later ops overwrite: the update must reduce at once."""
    stats = _fresh("relu", (3,), 0)
    y = torch.tensor([[0.0, 1.0, 2.0]])
    stats.update(y)
    y.fill_(-5.0)
    assert stats.to_host()["active"] == [0, 1, 1]
    assert stats.to_host()["min"] == 0.0


# ----------------------------------------------------------------------------- chunked temporaries (CPU)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "linear", "tokens", "no unit axis"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_chunked_per_unit_sums_equal_whole_tensor_sums(layout: str, chunk: int) -> None:
    """The CPU route counts and sums |y| chunk by chunk through a reused buffer (large
    activations only; the threshold is lowered here so small tensors take that path)."""
    from reluscope.measure import reductions as stats

    buffers = stats.ChunkBuffers(chunk_elements=chunk, chunked_above=0)
    generator = torch.Generator().manual_seed(5)
    y = torch.randn(9, 6, 5, 7, generator=generator)
    y[:, 2] = 0.0  # a dead unit
    unit_dim = {"nchw": 1, "channels_last": 1, "linear": 1, "tokens": 2, "no unit axis": None}[layout]
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "linear":
        y = y.reshape(9, 210)
    elif layout == "tokens":
        y = y.reshape(9, 35, 6)
    for transform in (stats.sign, stats.positive_sign, stats.absolute):
        got = buffers.per_unit_sum_of(y, unit_dim, transform)
        want = stats.per_unit_sum(transform(y, None), unit_dim)
        if transform is stats.absolute:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        else:
            assert torch.equal(got, want), transform.__name__  # counts: exact
    assert buffers.per_unit_sum_of(y, unit_dim, stats.positive_sign).min() >= 0


def test_a_large_activation_is_counted_through_a_buffer_smaller_than_it() -> None:
    import gc

    from reluscope.measure.reductions import ChunkBuffers, TorchReduction

    y = torch.randn(4, 8, 512, 512).relu_()  # 8M elements: above the chunking threshold
    act = classify("relu")
    route = TorchReduction()
    chunked = SiteStats(act, tuple(y.shape[1:]), 0, torch.device("cpu"), reduction=route)
    chunked.update(y)
    counts = (y > 0).sum(dim=(0, 2, 3))
    assert chunked.to_host()["active"] == counts.tolist()
    buffer = route.buffers.by_dtype[torch.float32]
    assert buffer.numel() < y.numel() // 2
    del route, chunked, buffer
    reluscope.analyze(nn.Sequential(nn.ReLU()), y[:2], batch_size=2)
    gc.collect()  # an analysis's buffers belong to its reduction route and go with it
    assert not [o for o in gc.get_objects() if isinstance(o, ChunkBuffers) and o.by_dtype]


# ----------------------------------------------------------------------------- the declared table
def test_every_declared_state_merges_with_its_operator() -> None:
    """merge() is derived from the table: each state combines with the operator it declares."""
    _COMBINE = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum, "any": torch.logical_or}

    left, right = _fresh("gelu", (3,), 0), _fresh("gelu", (3,), 0)
    left.percentiles = right.percentiles = True
    for stats, seed in ((left, 1), (right, 2)):
        stats._create_states(stats.arrays, stats.units)
        generator = torch.Generator().manual_seed(seed)
        for state, value in stats.states():
            fill = torch.randint(0, 100, value.shape, generator=generator)
            setattr(stats, state.name, fill.to(value.dtype) if state.dtype != "bool" else fill % 2 == 0)
        stats.samples, stats.elements = seed, 10 * seed
    expected = {state.name: _COMBINE[state.merge](getattr(left, state.name), getattr(right, state.name))
                for state, _ in left.states()}
    assert set(expected) == {state.name for state in SiteStats.STATES}  # every state is kept by this site
    left.merge(right)
    for name, value in expected.items():
        assert torch.equal(getattr(left, name), value), name
    assert (left.samples, left.elements) == (3, 30)


def _all_reduce_rank(rank: int, init_file: str, shards: list, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        stats = _fresh("prelu", (3, 2), 0)
        stats.percentiles = True
        stats._create_states(stats.arrays, stats.units)
        for pre in shards[rank]:
            _feed(stats, "prelu", pre)
        stats.all_reduce()
        results[rank] = stats.to_host()
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes_equals_one_update_of_the_union(tmp_path) -> None:
    """What torchrun runs: the same table's operators applied by the collective (gloo, 2 ranks)."""
    import torch.multiprocessing as mp

    rng = np.random.default_rng(3)
    shards = [[_batch(rng, 4, (3, 2), True), _batch(rng, 2, (3, 2), False)], [_batch(rng, 5, (3, 2), False)]]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_all_reduce_rank, args=(str(tmp_path / "init"), shards, results), nprocs=2, join=True)
        merged = [dict(results[0]), dict(results[1])]
    union = _fresh("prelu", (3, 2), 0)
    union.percentiles = True
    union._create_states(union.arrays, union.units)
    _feed(union, "prelu", torch.cat([b for shard in shards for b in shard]))
    for host in merged:
        _assert_same(host, union.to_host())
        assert host["percentiles"] == union.to_host()["percentiles"]
