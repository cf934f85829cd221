"""What `reluscope prune` buys: pruned vs original latency and size, measured in one run.

    .venv/bin/python benchmarks/prune.py                # the sample MLP (dead) and CNN, on the calibration digits
    .venv/bin/python benchmarks/prune.py --repeats 15

For each sample model: prune it (reluscope.prune, the Python API), then time the original and the
pruned model on the same batch, interleaved (pairs alternate which runs first; the median ratio
is the figure), in eager PyTorch and in onnxruntime (both exported the same way), and compare the
parameters and the bytes of their state_dict and ONNX files. Ratios are pruned / original: below
1 is a gain. Single timings on a shared machine drift by tens of percent: read the ratios.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import reluscope  # noqa: E402
from reluscope.backends import load_model  # noqa: E402

SAMPLES = REPO / "sample_models"
MODELS = [("digits_mlp_dead", "digits_mlp"), ("digits_cnn", "digits_cnn")]


def _seconds(call, loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        call()
    return (time.perf_counter() - start) / loops


def interleaved_ratio(original, pruned, repeats: int, loops: int) -> tuple[float, float, float]:
    """(median original seconds, median pruned seconds, median of the per-pair ratios pruned / original)."""
    original(), pruned()  # warm-up
    pairs = []
    for i in range(repeats):
        if i % 2:
            b = _seconds(pruned, loops)
            a = _seconds(original, loops)
        else:
            a = _seconds(original, loops)
            b = _seconds(pruned, loops)
        pairs.append((a, b))
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(b / a for a, b in pairs))


def onnx_session(module: torch.nn.Module, x: torch.Tensor, folder: Path, name: str):
    import logging
    import warnings

    import onnxruntime as ort

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, external_data=False, verbose=False)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, path.stat().st_size


def state_dict_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=360, help="rows timed per call (the calibration set: 360)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with np.load(SAMPLES / "digits_calib.npz") as archive:
        calib = archive["x"]
    x = torch.from_numpy(calib[: args.batch_size])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {len(x)}, {args.repeats} interleaved "
          "pairs per figure")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for file_stem, factory in MODELS:
            arch = f"{SAMPLES / 'architectures.py'}:{factory}"
            original = load_model(SAMPLES / f"{file_stem}.pt", arch=arch).module.eval()
            started = time.perf_counter()
            pruned, report = reluscope.prune(original, calib, batch_size=args.batch_size)
            prune_seconds = time.perf_counter() - started
            pruned.eval()
            summary = report["summary"]
            print(f"\n{file_stem}: removed {summary['removed_units']} of {summary['units_before']} units "
                  f"(reluscope.prune took {prune_seconds:.2f} s; verification: max relative difference "
                  f"{report['verification']['relative_diff']:.3g})")
            print(f"  parameters        {summary['parameters_before']:>9,} -> {summary['parameters_after']:>9,}  "
                  f"ratio {summary['parameters_ratio']:.3f}")
            print(f"  MACs per sample   {summary['macs_before']:>9,} -> {summary['macs_after']:>9,}  "
                  f"ratio {summary['macs_ratio']:.3f}")
            before, after = state_dict_bytes(original), state_dict_bytes(pruned)
            print(f"  state_dict bytes  {before:>9,} -> {after:>9,}  ratio {after / before:.3f}")
            with torch.inference_mode():
                a, b, ratio = interleaved_ratio(lambda: original(x), lambda: pruned(x), args.repeats, loops=20)
            print(f"  eager latency     {a * 1e3:8.3f} ms -> {b * 1e3:8.3f} ms  ratio {ratio:.3f}")
            session_a, size_a = onnx_session(original, x, folder, f"{file_stem}_original")
            session_b, size_b = onnx_session(pruned, x, folder, f"{file_stem}_pruned")
            feed = x.numpy()
            a, b, ratio = interleaved_ratio(lambda: session_a.run(None, {session_a.get_inputs()[0].name: feed}),
                                            lambda: session_b.run(None, {session_b.get_inputs()[0].name: feed}),
                                            args.repeats, loops=20)
            print(f"  ONNX file bytes   {size_a:>9,} -> {size_b:>9,}  ratio {size_b / size_a:.3f}")
            print(f"  onnxruntime       {a * 1e3:8.3f} ms -> {b * 1e3:8.3f} ms  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
