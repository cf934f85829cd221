"""Weight files that are pure data: `.safetensors` (read here, by hand) and the index files of
sharded checkpoints (`model.safetensors.index.json`, `pytorch_model.bin.index.json`).

The safetensors format is simple enough to read without its package, so a plain install reads
it: 8 bytes (little-endian u64) giving the length of a JSON header, the header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the raw
little-endian tensor bytes, offsets counted from the end of the header. Nothing in it can run:
the header is checked (sizes, offsets, dtypes) before any tensor is made from the bytes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import InputError, first_line
from ...files import looks_like_safetensors  # noqa: F401 - part of this module's API

# The largest header a real file has is a few MB (names and shapes of every tensor).
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                                      ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.[^/]+$")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, in the file's order (see the module's docstring)."""
    damaged = f"cannot read safetensors file {path}: {{}}; the file may be damaged or truncated, re-save it"
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8 or length > MAX_HEADER_BYTES:
            raise InputError(damaged.format(f"its header claims {length} bytes, the file holds {max(size - 8, 0)}"))
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InputError(damaged.format(f"its header is not JSON ({first_line(exc)})")) from exc
        data = bytearray(handle.read())  # writable: the tensors below are views of it
    if not isinstance(header, dict):
        raise InputError(damaged.format("its header is not a JSON object"))
    header.pop("__metadata__", None)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
                raise ValueError("negative or non-integer sizes")
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(damaged.format(f"the header entry of {name!r} is malformed ({first_line(exc)})")) from exc
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise InputError(f"safetensors file {path}: tensor {name!r} has dtype {dtype_name}, which this torch "
                             "cannot hold; convert the weights to float32/float16/bfloat16")
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not begin <= end <= len(data) or end - begin != count * itemsize:
            raise InputError(damaged.format(f"tensor {name!r} ({dtype_name}, shape {tuple(shape)}) needs "
                                            f"{count * itemsize} bytes at {begin}..{end}, the data holds {len(data)}"))
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
    return tensors


def read_weight_map(path: Path) -> dict[str, str]:
    """An index file's `weight_map` (weight name -> shard file name), checked: every shard must be a
    plain file name (a shard lies beside its index, never elsewhere)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of weight names to file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the shard index {path}: {first_line(exc)}; it should be JSON with a "
                         "\"weight_map\" of weight names to shard files, as save_pretrained writes it") from exc
    shards = list(dict.fromkeys(weight_map.values()))
    outside = [name for name in shards if Path(name).name != name or name in (".", "..")]
    if outside:
        raise InputError(f"the shard index {path} names {outside[0]!r}, which is not a file beside it; shards must "
                         "lie in the index's folder")
    return weight_map


def read_index(path: Path, read_shard: Callable[[Path], Any]) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: its index file's `weight_map` names a shard (a file
    beside the index) for each weight; every shard is read with `read_shard`."""
    weight_map = read_weight_map(path)
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in shards if not (path.parent / name).is_file()]
    if missing:
        raise InputError(f"the shard index {path} lists {len(shards)} shards, and "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                         f"{'is' if len(missing) == 1 else 'are'} not beside it; copy every shard beside the index")
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        shard = read_shard(path.parent / name)
        tensors.update(shard)
    absent = [key for key in weight_map if key not in tensors]
    if absent:
        raise InputError(f"the shard index {path} maps {len(absent)} weights to shards that do not hold them "
                         f"({', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}); re-save the checkpoint")
    return tensors


def index_beside(shard: Path) -> Path | None:
    """For a file named like `model-00001-of-00003.safetensors`: the index file beside it that lists it."""
    match = SHARD_NAME.search(shard.name)
    if match is None or int(match.group(2)) <= 1:
        return None
    candidates = [shard.parent / name for name in INDEX_NAMES]
    candidates += sorted(p for p in shard.parent.glob("*.index.json") if p not in candidates)
    for candidate in candidates:
        try:
            weight_map = json.loads(candidate.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(weight_map, dict) and shard.name in weight_map.values():
            return candidate
    return None


def shard_of(shard: Path) -> tuple[int, int] | None:
    match = SHARD_NAME.search(shard.name)
    return (int(match.group(1)), int(match.group(2))) if match and int(match.group(2)) > 1 else None
