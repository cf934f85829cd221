"""Wall time of whole `reluscope` processes, as a user sees them: `--help`, and analysing the
bundled ONNX sample (which must not import torch) next to the bundled state_dict sample.

    python benchmarks/startup.py [--repeats 7]

Each command runs `--repeats` times, interleaved; the median is printed. Targets: `--help` under
0.3 s, the ONNX analysis under 1.0 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
COMMANDS = {
    "reluscope --help": ["--help"],
    "analyze digits_mlp_dead.onnx": ["analyze", str(SAMPLES / "digits_mlp_dead.onnx"),
                                     "--data", str(SAMPLES / "digits_calib.npz"), "-q", "-f", "json"],
    "analyze digits_mlp_dead.pt (torch)": ["analyze", str(SAMPLES / "digits_mlp_dead.pt"), "--arch",
                                           f"{SAMPLES / 'architectures.py'}:digits_mlp",
                                           "--data", str(SAMPLES / "digits_calib.npz"), "-q", "-f", "json"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "reluscope", *command], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    for name, values in times.items():
        print(f"{name:38s} median {statistics.median(values):6.3f} s   (min {min(values):.3f}, max {max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
