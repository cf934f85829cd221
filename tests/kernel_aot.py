"""Compile reluscope's statistics kernel ahead of time for an NVIDIA GPU, with no GPU present.

Triton's wheel carries ptxas and cuobjdump, so the kernel goes all the way to a cubin for a
chosen architecture: what the interpreter in the tests cannot show (a construct that the GPU
compiler rejects, register spills) shows here. Prints one JSON line per variant.

    python tests/kernel_aot.py [--arch 90]

Run it without TRITON_INTERPRET (test_triton_stats.py starts it in a clean subprocess).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reluscope.backends.torch import triton_kernel as triton_stats  # noqa: E402

POINTERS = {"x_ptr": None, "active_ptr": "*i64", "abs_ptr": "*fp64", "saturated_ptr": "*i64",
            "nonfinite_ptr": "*i64", "min_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp64", "sumsq_ptr": "*fp64"}
SCALARS = {"outer": "i32", "units": "i32", "inner": "i32", "inner_chunks": "i32", "tiles_per_program": "i32",
           "upper": "fp32"}
# (x dtype, units, inner, HAS_ABS, HAS_UPPER): the tile shapes of ResNet-style NCHW maps (large,
# 7x7, 14x14), units on the last axis (linear, channels_last), and each optional statistic.
VARIANTS = [("*fp32", 64, 3136, False, False), ("*fp32", 2048, 49, False, True), ("*fp32", 256, 196, True, False),
            ("*fp32", 512, 1, True, True), ("*fp16", 10, 1, False, False), ("*bf16", 768, 1, True, False)]


def compile_variant(arch: int, x_dtype: str, units: int, inner: int, has_abs: bool, has_upper: bool,
                    workdir: Path) -> dict[str, object]:
    kernel = triton_stats._site_stats_kernel
    names = [p.name for p in kernel.params]
    rows, unit_block, inner_block = triton_stats.tile_shape(units, inner)
    signature = {**POINTERS, "x_ptr": x_dtype, **SCALARS}
    signature.update({name: "constexpr" for name in ("ROWS", "UNIT_BLOCK", "INNER_BLOCK", "HAS_ABS", "HAS_UPPER")})
    # What Triton's launcher would specialise on: 16-byte aligned pointers, sizes divisible by 16.
    aligned = [i for i, name in enumerate(names) if name.endswith("_ptr")]
    aligned += [names.index(name) for name, value in (("units", units), ("inner", inner)) if value % 16 == 0]
    constants = {"ROWS": rows, "UNIT_BLOCK": unit_block, "INNER_BLOCK": inner_block, "HAS_ABS": has_abs,
                 "HAS_UPPER": has_upper}
    if inner == 1:  # the launcher turns integer arguments equal to 1 into constants
        signature["inner"] = "constexpr"
        constants["inner"] = 1
    source = ASTSource(kernel, signature, constexprs=constants,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": triton_stats.NUM_WARPS})
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {"x": x_dtype, "units": units, "inner": inner, "tile": [rows, unit_block, inner_block],
            "registers": int(found["REG"]), "spill_bytes": int(found.get("LOCAL", 0)) + int(found.get("STACK", 0)),
            "vector_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.v2"),
            "atomics": len(re.findall(r"\batom\.", ptx)) + len(re.findall(r"\bred\.", ptx))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as a number: 80, 90...")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:
            print(json.dumps(compile_variant(args.arch, *variant, Path(folder))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
