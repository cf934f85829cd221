"""Calibration data sources: arrays, .npy/.npz/.pt files, image folders, texts (.txt/.jsonl,
tokenized by the model's tokenizer), synthetic inputs, or any iterable of batches. Each yields `Batch`es lazily; nothing holds the whole dataset
in memory beyond what the source itself maps (np.load(mmap_mode='r') for .npy, one batch of
rows at a time from inside an .npz)."""

from __future__ import annotations

import json
import math
import pickle
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import InputError, UsageError, first_line
from .options import NO_NORMALIZE, Normalize, parse_normalize
from .options import parse_shape  # noqa: F401 - part of this module's API (tests, callers)
from .files import check_readable_file, unpickling_refused

INPUT_KEYS = ("x", "inputs", "input", "data")
LABEL_KEYS = ("y", "labels", "label", "targets")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SYNTHETIC_SAMPLES = 256


@dataclass
class Batch:
    # numpy arrays, or torch tensors where the caller gave tensors (backends convert to what they run)
    inputs: tuple[Any, ...] | dict[str, Any]
    labels: Any
    size: int
    # bool [batch, seq], True at real tokens (the attention mask): padding is left out of every statistic
    mask: Any = None


@dataclass
class DataSource:
    """A description plus a way to iterate batches; `samples` is None when unknown (generators)."""

    description: str
    synthetic: bool
    samples: int | None
    arrays: tuple[Any, ...] | dict[str, Any] | None = None  # indexable inputs
    labels: Any = None
    iterable: Iterable[Any] | None = None
    named: dict[str, Any] | None = None  # a mapping's input arrays by name, for models that name their inputs
    wanted: tuple[str, ...] | None = None  # the model's input names, once known (see select_inputs)

    def select_inputs(self, names: Sequence[str]) -> DataSource:
        """This source feeding the model's inputs by name: where the data names an array after every one of
        them, the batches hold exactly those (an `input` key no longer hides a `state`). Data that names
        some of them but not all is refused, saying which are missing."""
        names = tuple(names)
        if self.named is not None and len(self.named) > 1:
            present = [name for name in names if name in self.named]
            if present and len(present) < len(names):
                missing = [name for name in names if name not in self.named]
                raise InputError(f"the model takes inputs {list(names)}; the data names {sorted(self.named)} but has "
                                 f"no {' or '.join(repr(m) for m in missing)}; add an array for each input, under its "
                                 "name (a 0-d array for a scalar input)")
        return replace(self, wanted=names)
    reader: Callable[[int, int], Batch] | None = None  # samples [start:stop] as one Batch (texts)
    normalize: Normalize | None = None  # image folders: what was done to the 0..1 pixels

    def batches(self, batch_size: int, max_samples: int | None = None,
                owns: Callable[[int], bool] | None = None) -> Iterator[Batch]:
        """Batches in order; with `owns`, only the batches whose index it accepts (a shard),
        and those are the only ones decoded."""
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.iterable is not None:
            for index, batch in enumerate(_from_iterable(self.iterable, max_samples, self.wanted)):
                if owns is None or owns(index):
                    yield with_token_mask(batch)
            return
        total = self.samples or 0
        if max_samples is not None:
            total = min(total, max_samples)
        for index, start in enumerate(range(0, total, batch_size)):
            if owns is not None and not owns(index):
                continue
            stop = min(start + batch_size, total)
            if self.reader is not None:
                yield self.reader(start, stop)
                continue
            if self.named is not None and self.wanted and all(name in self.named for name in self.wanted):
                inputs: Any = {k: _as_array(_rows(self.named[k], start, stop), k) for k in self.wanted}
            elif isinstance(self.arrays, dict):
                inputs = {k: _as_array(_rows(v, start, stop), k) for k, v in self.arrays.items()}
            else:
                inputs = tuple(_as_array(_rows(a, start, stop), "input") for a in self.arrays or ())
            labels = None if self.labels is None else _as_array(self.labels[start:stop], "labels", keep_int=True)
            yield with_token_mask(Batch(inputs, labels, stop - start))

    @property
    def replayable(self) -> bool:
        """Whether the batches can be read a second time: arrays, files and lists or tuples of
        batches can; any other iterable may be a one-pass generator."""
        return self.iterable is None or isinstance(self.iterable, (list, tuple))

    @property
    def rebatchable(self) -> bool:
        """Whether the batch size is ours to choose (arrays and files; an iterable brings its own)."""
        return self.iterable is None

    def planned_samples(self, max_samples: int | None) -> int | None:
        if self.samples is None:
            return max_samples
        return self.samples if max_samples is None else min(self.samples, max_samples)


def _rows(array: Any, start: int, stop: int) -> Any:
    """Rows [start:stop] of an input; a 0-d input (a model's scalar input: a sample rate) goes whole into
    every batch."""
    if getattr(array, "ndim", 1) == 0:
        return array.whole() if isinstance(array, NpzMember) else array
    return array[start:stop]


_DTYPE_KINDS = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers", "M": "dates",
                "m": "time spans", "V": "structured records"}


def _wrong_dtype(what: str, dtype: Any, kind: str) -> InputError:
    return InputError(f"calibration {what} has dtype {dtype} ({_DTYPE_KINDS.get(kind, 'not numbers')}); give real "
                      "numbers: float, integer or bool arrays")


def is_tensor(value: Any) -> bool:
    """Whether `value` is a torch tensor, without importing torch (if torch is not loaded, it is not one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_array(value: Any, what: str, keep_int: bool = False) -> Any:
    """Values as a batch holds them: a torch tensor stays a tensor; anything else becomes a C-contiguous
    numpy array of native byte order (the torch backend wraps it without a copy, and the ONNX backend
    feeds it as it is, so numpy data never needs torch). Booleans become 0.0/1.0 unless `keep_int`
    (labels). float64 (numpy's default) stays float64: the backend casts to the dtype the model
    computes in, and says so in a warning; a float64 model keeps its precision."""
    if is_tensor(value):
        import torch

        if value.is_complex():
            raise _wrong_dtype(what, value.dtype, "c")
        if value.dtype == torch.bool and not keep_int:
            value = value.float()
        return value
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise _wrong_dtype(what, array.dtype, array.dtype.kind)
    if not array.dtype.isnative:  # big-endian files ('>f4'): torch reads native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        array = array.copy()  # memory-mapped .npy: a model writing to its input must not hit read-only pages
    array = np.require(array, requirements="C")  # 0-d stays 0-d (a scalar input)
    if array.dtype == np.bool_ and not keep_int:
        array = array.astype(np.float32)
    return array


def _is_floating(value: Any) -> bool:
    return value.is_floating_point() if is_tensor(value) else np.asarray(value).dtype.kind == "f"


def _as_batch(item: Any, wanted: tuple[str, ...] | None = None) -> Batch:
    labels = None
    if isinstance(item, Mapping) and wanted and all(name in item for name in wanted):
        item = dict(item)
        key = next((k for k in LABEL_KEYS if k in item and k not in wanted), None)
        labels = None if key is None else _as_array(item[key], "labels", keep_int=True)
        inputs_by_name = {name: _as_array(item[name], name) for name in wanted}
        first = next((v for v in inputs_by_name.values() if v.ndim), None)
        return Batch(inputs_by_name, labels, first.shape[0] if first is not None else 1)
    if isinstance(item, Mapping):
        item = dict(item)
        for key in LABEL_KEYS:
            if key in item:
                labels = _as_array(item.pop(key), "labels", keep_int=True)
                break
        if len(item) == 1 or any(k in item for k in INPUT_KEYS):
            key = next((k for k in INPUT_KEYS if k in item), next(iter(item)))
            inputs: Any = (_as_array(item[key], "input"),)
        else:
            inputs = {k: _as_array(v, k) for k, v in item.items()}
    elif isinstance(item, (tuple, list)):
        tensors = [_as_array(v, "input") for v in item]
        if len(tensors) == 2 and _looks_like_labels(tensors[1], tensors[0]):
            inputs, labels = (tensors[0],), tensors[1]
        else:
            inputs = tuple(tensors)
    else:
        inputs = (_as_array(item, "input"),)
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    first = next((v for v in values if v.ndim), values[0])
    size = first.shape[0] if first.ndim else 1
    return Batch(inputs, labels, size)


def _looks_like_labels(candidate: Any, inputs: Any) -> bool:
    return (candidate.ndim == 1 and not _is_floating(candidate) and inputs.ndim > 0
            and candidate.shape[0] == inputs.shape[0])


def _from_iterable(iterable: Iterable[Any], max_samples: int | None,
                   wanted: tuple[str, ...] | None = None) -> Iterator[Batch]:
    seen = 0
    for item in iterable:
        batch = _as_batch(item, wanted)
        if max_samples is not None and seen + batch.size > max_samples:
            keep = max_samples - seen
            if keep <= 0:
                return
            batch = _truncate(batch, keep)
        seen += batch.size
        yield batch
        if max_samples is not None and seen >= max_samples:
            return


def _truncate(batch: Batch, keep: int) -> Batch:
    if isinstance(batch.inputs, dict):
        inputs: Any = {k: _rows(v, 0, keep) for k, v in batch.inputs.items()}
    else:
        inputs = tuple(_rows(v, 0, keep) for v in batch.inputs)
    return Batch(inputs, None if batch.labels is None else batch.labels[:keep], keep)


# ---------------------------------------------------------------------------- sources
def from_object(data: Any, *, input_shape: Sequence[int] | None = None, tokenizer: Any = None,
                max_length: int = 128, normalize: Any = None) -> DataSource:
    """The API's `data` argument: None (synthetic), a path, a tensor/array, or an iterable of batches.
    `tokenizer` (the model's, see `text_source`) reads text files; `normalize` (see
    options.parse_normalize) applies to folders of images only."""
    if data is None:
        return synthetic(input_shape)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
            return text_source(path, tokenizer, max_length)
        return from_path(path, input_shape=input_shape, normalize=normalize)
    if is_tensor(data) or isinstance(data, np.ndarray):
        if data.ndim == 0:
            raise InputError("calibration data is a scalar; give a batch with the sample axis first")
        return DataSource("in-memory array", False, int(data.shape[0]), arrays=(data,))
    if isinstance(data, Mapping):
        return _from_mapping(dict(data), "in-memory mapping")
    if isinstance(data, tuple) and data and all(is_tensor(v) or isinstance(v, np.ndarray) for v in data):
        # A tuple is one dataset ((x, y) or several inputs); a list is a sequence of batches.
        return _from_tensors(data, "in-memory tuple")
    if isinstance(data, Iterable):
        return DataSource("iterable of batches", False, None, iterable=data)
    raise UsageError(f"data must be a path, an array, a tensor or an iterable of batches, not {type(data).__name__}")


def from_path(path: Path, *, input_shape: Sequence[int] | None = None, normalize: Any = None) -> DataSource:
    # missing, a symlink loop, a FIFO (open() would block), a device, empty: one clear line each
    check_readable_file(path, "calibration data", folder_ok=True)
    if path.is_dir():
        return image_folder(path, input_shape, normalize)
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(6)
    try:
        if head.startswith(b"\x93NUMPY"):
            with path.open("rb") as handle:
                _check_npy_header(handle, path.stat().st_size, str(path))
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return _checked(DataSource(str(path), False, int(array.shape[0]) if array.ndim else 0, arrays=(array,)))
        if head.startswith(b"PK") and suffix == ".npz":
            return _from_mapping(_npz_members(path), str(path))
        if head.startswith(b"PK") or head[:1] == b"\x80":
            import torch  # a torch.save file: only torch reads it

            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                unsafe, detail = unpickling_refused(exc)
                if not unsafe:
                    raise InputError(f"cannot read calibration data {path}: it is not a readable pickle ({detail}); "
                                     "the file may be damaged or truncated") from exc
                # weights_only=True refused a global: nothing from the file ran. torch's own message
                # suggests weights_only=False, which would run it; data never needs that.
                raise InputError(f"refused to read calibration data {path}: it holds pickled Python objects beyond "
                                 "tensors, and unpickling them would run code from the file; save a tensor, a tuple "
                                 "or a dict of tensors, or use .npy/.npz") from exc
            return _from_torch_object(obj, str(path))
    except (InputError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zip/pickle raise many types for damaged files
        if "allow_pickle" in str(exc):  # numpy refused an object array: not damage, a pickle
            raise InputError(f"refused to read calibration data {path}: it holds arrays of Python objects, and "
                             "unpickling them would run code from the file; save numeric arrays") from exc
        raise InputError(f"cannot read calibration data {path}: {first_line(exc, first_sentence=True)}; the file may be damaged or "
                         "truncated") from exc
    raise InputError(f"calibration data {path} is not .npy, .npz, a torch.save file, texts (.txt, .jsonl) or a "
                     "folder of images")



def _human_bytes(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _check_npy_header(handle: Any, size: int, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Refuse an .npy header that declares more data than the file holds, before numpy maps or
    allocates it: a damaged or hostile header may claim terabytes. Returns (shape, fortran_order,
    dtype), with `handle` left at the first data byte."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(handle)
    # version 3.0 only allows utf-8 in field names; its header layout is 2.0's
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran_order, dtype = read(handle)
    if dtype.hasobject:
        raise InputError(f"refused to read calibration data {what}: it holds arrays of Python objects, and "
                         "unpickling them would run code from the file; save numeric arrays")
    claimed = math.prod(shape) * dtype.itemsize
    available = size - handle.tell()
    if claimed > available:
        raise InputError(f"calibration data {what} declares an array of shape {tuple(shape)} and dtype {dtype} "
                         f"({_human_bytes(claimed)}) but holds {_human_bytes(max(available, 0))} of data; the file "
                         "is truncated or damaged")
    return tuple(shape), fortran_order, dtype


# A member that cannot be read a row range at a time (Fortran order, 0-d) is read whole up to this size:
# np.load's behaviour for the small column-major arrays pandas and transposes produce.
WHOLE_MEMBER_LIMIT = 256_000_000


class NpzMember:
    """One array inside an .npz archive, read a slice of rows at a time.

    np.load decompresses a whole member on first access, so a large (or hostile: a few MB that
    inflate to many GB) archive would sit in memory at once. Here only the header is read up
    front; `member[start:stop]` seeks to the rows and reads just those bytes. Batches come in
    order, so each seek moves forward (a compressed member is inflated once per pass)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> None:
        from numpy.lib import format as npy_format

        self._archive, self._what = archive, what  # the archive stays open while members are read
        self._member = archive.open(info)
        self.shape, fortran_order, self.dtype = _check_npy_header(self._member, info.file_size, what)
        self._offset = self._member.tell()
        self._whole = None
        if fortran_order or not self.shape:  # column-major rows are not contiguous: read whole, as np.load would
            size = math.prod(self.shape) * self.dtype.itemsize
            if size > WHOLE_MEMBER_LIMIT:  # a few MB of zip may inflate to many GB: refuse before reading
                kind = ("is stored in Fortran (column-major) order, so its rows are not contiguous and it would be "
                        "read whole" if self.shape else "is a single (0-d) value")
                raise InputError(f"calibration data {what} {kind}: {_human_bytes(size)}, more than reluscope reads "
                                 f"at once ({_human_bytes(WHOLE_MEMBER_LIMIT)}); save it in C (row-major) order, "
                                 "e.g. np.savez(path, x=np.ascontiguousarray(x))")
            self._member.seek(0)
            self._whole = npy_format.read_array(self._member, allow_pickle=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def whole(self) -> np.ndarray:
        """A 0-d member's value."""
        return self._whole

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self._whole is not None:
            return self._whole[rows]
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise TypeError("NpzMember supports contiguous row slices only")
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        count = max(stop - start, 0)
        try:
            self._member.seek(self._offset + start * row_bytes)
            raw = self._member.read(count * row_bytes)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(f"cannot read calibration data {self._what}: {first_line(exc, first_sentence=True)}; the file may be "
                             "damaged or truncated") from exc
        if len(raw) != count * row_bytes:
            raise InputError(f"cannot read calibration data {self._what}: it ends after {len(raw)} of "
                             f"{count * row_bytes} bytes at row {start}; the file is truncated or damaged")
        return np.frombuffer(raw, dtype=self.dtype).reshape((count, *self.shape[1:]))


def _npz_members(path: Path) -> dict[str, Any]:
    """An .npz archive's arrays by name, each read lazily (see NpzMember). The archive stays open
    while the data source lives: batches are read from it during the analysis."""
    archive = zipfile.ZipFile(path)
    members: dict[str, Any] = {}
    for info in archive.infolist():
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if info.filename.endswith(".npy"):
            members[name] = NpzMember(archive, info, f"{path} (array {name!r})")
        else:
            members[name] = archive.read(info)  # not an array: reported as such by _from_mapping
    return members


def _checked(source: DataSource) -> DataSource:
    if not source.samples:
        raise InputError(f"calibration data {source.description} holds no samples; give at least one sample")
    return source


def _from_mapping(mapping: dict[str, Any], description: str) -> DataSource:
    labels = None
    for key in LABEL_KEYS:
        if key in mapping:
            labels = mapping.pop(key)
            break
    if not mapping:
        raise InputError(f"{description} holds labels but no inputs (expected a key {' or '.join(INPUT_KEYS[:2])})")
    key = next((k for k in INPUT_KEYS if k in mapping), None)
    arrays: Any = (mapping[key],) if key is not None else (
        (next(iter(mapping.values())),) if len(mapping) == 1 else dict(mapping))
    values = arrays if isinstance(arrays, tuple) else tuple(arrays.values())
    batched = [value for value in values if getattr(value, "ndim", 0) > 0]
    unbatched = [value for value in values if not hasattr(value, "ndim")]
    if unbatched or not batched:  # a 0-d array alongside batched ones is a scalar input, fed whole to every batch
        value = (unbatched or values)[0]
        raise InputError(f"{description}: an input ({type(value).__name__}, shape "
                         f"{tuple(getattr(value, 'shape', ()))}) has no sample axis; give arrays or tensors with "
                         "the samples along the first axis")
    samples = int(batched[0].shape[0])
    for value in batched:
        if int(value.shape[0]) != samples:
            raise InputError(f"{description}: input arrays disagree on the number of samples "
                             f"({', '.join(str(tuple(getattr(v, 'shape', ()))) for v in values)})")
    if labels is not None and (getattr(labels, "ndim", 0) == 0 or int(labels.shape[0]) != samples):
        raise InputError(f"{description}: {samples} inputs but labels of shape {tuple(getattr(labels, 'shape', ()))}; "
                         "labels need one entry per sample")
    named = {k: v for k, v in mapping.items() if hasattr(v, "ndim")}
    return _checked(DataSource(description, False, samples, arrays=arrays, labels=labels, named=named or None))


def _from_torch_object(obj: Any, description: str) -> DataSource:
    if is_tensor(obj):
        return _checked(DataSource(description, False, int(obj.shape[0]) if obj.ndim else 0, arrays=(obj,)))
    if isinstance(obj, Mapping):
        return _from_mapping(dict(obj), description)
    if isinstance(obj, (tuple, list)) and obj and all(is_tensor(t) for t in obj):
        return _from_tensors(tuple(obj), description)
    raise InputError(f"{description} holds a {type(obj).__name__}; expected a tensor, a tuple or a dict of tensors")


def _from_tensors(tensors: tuple[Any, ...], description: str) -> DataSource:
    """A tuple of tensors or arrays: (inputs, labels), or several inputs."""
    if len(tensors) == 2 and _looks_like_labels(tensors[1], tensors[0]):
        return _from_mapping({"x": tensors[0], "y": tensors[1]}, description)
    return _checked(DataSource(description, False, int(tensors[0].shape[0]) if tensors[0].ndim else 0,
                               arrays=tuple(tensors)))


def image_folder(path: Path, input_shape: Sequence[int] | None, normalize: Any = None) -> DataSource:
    """Every image under `path` (sorted by path), converted to `C` channels (1: grayscale, 3: RGB),
    resized to HxW, scaled to 0..1 (divided by 255) and then normalised: (x - mean) / std per channel."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if input_shape is None or len(input_shape) != 3:
        raise UsageError("a folder of images needs --input-shape C,H,W (e.g. 3,224,224) to resize them")
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise UsageError(f"--input-shape for images needs 1 or 3 channels, not {channels}")
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb bound (None: switched off by the caller)
    if limit is not None and height * width > limit:  # before any image is decoded or any batch allocated
        raise UsageError(f"--input-shape {channels},{height},{width} resizes every image to {height * width:,} "
                         f"pixels, more than Pillow decodes ({limit:,}: its guard against decompression bombs); "
                         "give the model's input size, e.g. 3,224,224")
    norm = parse_normalize(normalize)
    if len(norm.mean) not in (0, 1, channels):
        given = "ImageNet's mean and std are per RGB channel" if norm.method == "imagenet" else \
            f"it gives {len(norm.mean)} means and stds"
        raise UsageError(f"--normalize {_normalize_text(norm)}: {given}, but the images are read with {channels} "
                         f"channel{'s' if channels > 1 else ''} (--input-shape); give one MEAN,STD pair or one per "
                         "channel")
    if len(norm.mean) == 1:  # one pair for every channel: recorded per channel
        norm = Normalize(norm.method, norm.mean * channels, norm.std * channels)
    return DataSource(str(path), False, len(files), arrays=(_ImageStack(files, channels, height, width, norm),),
                      normalize=norm)


def _normalize_text(norm: Normalize) -> str:
    return norm.method if norm.method != "custom" else ",".join(f"{v:g}" for v in norm.mean + norm.std)


class _ImageStack:
    """Decodes images on slicing, so a folder streams batch by batch."""

    def __init__(self, files: list[Path], channels: int, height: int, width: int,
                 normalize: Normalize = NO_NORMALIZE) -> None:
        self.files, self.channels, self.height, self.width = files, channels, height, width
        self.shape = (len(files), channels, height, width)
        self.ndim = 4
        self.mean = self.std = None
        if normalize.mean:  # per channel, broadcast over (C, H, W)
            self.mean = np.broadcast_to(np.asarray(normalize.mean, np.float32), (channels,))[:, None, None]
            self.std = np.broadcast_to(np.asarray(normalize.std, np.float32), (channels,))[:, None, None]

    def __getitem__(self, index: slice) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        files = self.files[index]
        shape = (len(files), self.channels, self.height, self.width)
        _check_batch_memory(math.prod(shape) * 4, f"a batch of {len(files)} images of {','.join(map(str, shape[1:]))}")
        out = np.empty(shape, dtype=np.float32)
        for row, file in enumerate(files):
            try:
                with Image.open(file) as image:
                    image = image.convert("L" if self.channels == 1 else "RGB").resize((self.width, self.height))
                    array = np.asarray(image, dtype=np.float32) / 255.0
            except Image.DecompressionBombError as exc:
                raise InputError(f"refused to decode image {file}: {str(exc).split(',')[0]} (Pillow's guard against "
                                 "decompression bombs); calibration images need far fewer pixels, remove or shrink "
                                 "it") from exc
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"cannot decode image {file}: {exc}") from exc
            out[row] = array[None] if self.channels == 1 else array.transpose(2, 0, 1)
        if self.mean is not None:
            out -= self.mean
            out /= self.std
        return out


def _available_memory() -> int | None:
    """Bytes of memory the kernel says are available (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_batch_memory(needed: int, what: str) -> None:
    """Refuse a batch that cannot fit in the memory available, before filling it: pages filled one by one
    would otherwise end with the kernel killing the process (no message, no exit code of ours)."""
    available = _available_memory()
    if available is not None and needed > available:
        raise InputError(f"{what} needs {_human_bytes(needed)} as float32, more than the {_human_bytes(available)} of "
                         "memory available; pass a smaller --batch-size or --input-shape")


# How many images the standardisation check reads (decoded again when their batch comes).
_HINT_IMAGES = 32


def normalize_warnings(source: DataSource, requested: Any, module: Any) -> list[str]:
    """Warnings about --normalize before the analysis: it was asked for data that is not a folder of
    images (which is fed as stored), or un-normalised pixels meet a model whose first layer looks
    trained on standardised inputs (see `_looks_standardised`)."""
    requested = parse_normalize(requested)
    if source.normalize is None:
        if requested.method == "none":
            return []
        return [f"--normalize {_normalize_text(requested)} applies to folders of images only; "
                f"{source.description} is fed as stored"]
    if source.normalize.method != "none" or not source.samples:
        return []
    try:
        pixels = np.asarray(source.arrays[0][:_HINT_IMAGES])  # type: ignore[index]
        verdict = _looks_standardised(module, pixels.mean(axis=(0, 2, 3), dtype=np.float64))
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - a hint must never stop an analysis
        return []
    if verdict is None:
        return []
    return [f"the images are fed as 0..1 pixels (--normalize none), but the model's first layer ({verdict}) "
            "looks trained on standardised inputs; pass --normalize imagenet or MEAN,STD as in its training"]


def _looks_standardised(module: Any, pixel_mean: np.ndarray) -> str | None:
    """The name of the first convolution when its BatchNorm's running mean says the model was trained
    on standardised inputs (mean about 0 per channel) rather than on pixels like these; else None.

    The first conv's output mean over the training inputs is bias + sum(W * E[x]) per output channel,
    and the BatchNorm right after it kept that mean (running_mean). Two guesses for E[x]: 0
    (standardised training inputs) and the mean of these images (0..1 pixels), each giving a
    residual per channel in units of the running std. The warning needs the first guess to fit
    clearly better (a quarter of the second's sum of squared residuals) and the guesses to lie apart
    (these pixels move the conv outputs by a quarter of a std or more, root mean square over the
    channels; filters without a brightness component, such as edge detectors, cannot tell). Only
    PyTorch models whose first 4-D weight is followed by a BatchNorm (running statistics in the
    state_dict) are judged: weights only, nothing runs."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    state = module.state_dict()
    conv_key = next((k for k, v in state.items() if k.endswith("weight") and v.dim() == 4), None)
    if conv_key is None:
        return None
    weight = state[conv_key].detach().double().cpu()
    out_channels, in_channels = weight.shape[:2]
    if in_channels != len(pixel_mean):
        return None
    prefix = conv_key[: -len("weight")]
    bias = state.get(prefix + "bias")
    bias = torch.zeros(out_channels, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    bn_key = next((k for k in state if k.endswith("running_mean")), None)
    if bn_key is None or list(state).index(bn_key) < list(state).index(conv_key):
        return None
    running_mean = state[bn_key].detach().double().cpu()
    running_var = state.get(bn_key[: -len("running_mean")] + "running_var")
    if running_var is None or running_mean.shape != (out_channels,) or bias.shape != (out_channels,):
        return None
    scale = running_var.detach().double().cpu().clamp_min(1e-12).sqrt()
    shift = (weight.sum(dim=(2, 3)) @ torch.from_numpy(np.asarray(pixel_mean, np.float64))) / scale
    if_standardised = ((running_mean - bias) / scale).square().sum().item()
    if_pixels = ((running_mean - bias) / scale - shift).square().sum().item()
    if shift.square().mean().item() >= 0.25 ** 2 and if_standardised <= 0.25 * if_pixels:
        return conv_key[: -len(".weight")] or "conv"
    return None


def synthetic(input_shape: Sequence[int] | None, samples: int = SYNTHETIC_SAMPLES, seed: int = 0) -> DataSource:
    if not input_shape:
        raise UsageError("no --data given: pass --data FILE, or --input-shape (e.g. 3,224,224) for synthetic inputs")
    shape = tuple(int(d) for d in input_shape)
    if any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {','.join(map(str, shape))} has a non-positive dimension")
    return DataSource(f"synthetic normal({','.join(map(str, shape))})", True, samples,
                      arrays=(_SyntheticStack(shape, samples, seed),))


class _SyntheticStack:
    """Standard normal inputs, reproducible and never all in memory: samples come in fixed
    chunks, each drawn from its own seed, so any slicing (any --batch-size) sees the same data."""

    CHUNK = 64

    def __init__(self, shape: tuple[int, ...], samples: int, seed: int) -> None:
        self.sample_shape, self.seed = shape, seed
        self.shape = (samples, *shape)
        self.ndim = len(self.shape)

    def _chunk(self, index: int) -> np.ndarray:
        # numpy's generator, so that an ONNX analysis on synthetic inputs needs no torch either
        generator = np.random.default_rng(self.seed * 1_000_003 + index)
        return generator.standard_normal((self.CHUNK, *self.sample_shape), dtype=np.float32)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.shape[0])
        if stop <= start:
            return np.empty((0, *self.sample_shape), dtype=np.float32)
        first, last = start // self.CHUNK, (stop - 1) // self.CHUNK
        block = np.concatenate([self._chunk(i) for i in range(first, last + 1)])
        offset = first * self.CHUNK
        return block[start - offset:stop - offset]


# ---------------------------------------------------------------------------- texts and token masks
TEXT_SUFFIXES = (".txt", ".jsonl")  # texts have no magic number: the suffix says which kind of file it is
TOKEN_MASK_KEY = "attention_mask"


def with_token_mask(batch: Batch) -> Batch:
    """A batch of token ids given as arrays (.npz, a dict) carries its `attention_mask` as the batch's mask."""
    if batch.mask is None and isinstance(batch.inputs, dict):
        mask = batch.inputs.get(TOKEN_MASK_KEY)
        if mask is not None and mask.ndim == 2:
            batch.mask = mask != 0
    return batch


def text_source(path: Path, tokenizer: Any, max_length: int = 128) -> DataSource:
    """Texts, one per line (.txt) or in the `text` field of each JSON line (.jsonl), tokenized a batch at a
    time by the model's `tokenizer` (`encode(texts, max_length)` -> (inputs, attention mask)) and padded to
    the batch's longest text. Blank lines are skipped; only line offsets are kept in memory."""
    check_readable_file(path, "calibration data")
    if tokenizer is None:
        raise InputError(f"calibration data {path} is text: it needs the model's tokenizer, which only a Hugging "
                         "Face model folder (config.json, weights, tokenizer files) brings; for other models give "
                         "token ids as .npz (input_ids, attention_mask)")
    if max_length < 1:
        raise UsageError(f"--max-length must be at least 1, not {max_length}")
    lines = _TextLines(path, jsonl=path.suffix.lower() == ".jsonl")
    if lines:
        lines[0:1]  # a malformed first line fails here, before the model runs
    check = getattr(tokenizer, "check", None)
    if check is not None:
        check()

    def read(start: int, stop: int) -> Batch:
        inputs, mask = tokenizer.encode(lines[start:stop], max_length)
        return Batch(dict(inputs), None, stop - start, mask)

    return _checked(DataSource(str(path), False, len(lines), reader=read))


class _TextLines:
    """The non-blank lines of a text file, read by slice: one pass records where each starts."""

    def __init__(self, path: Path, jsonl: bool) -> None:
        self.path, self.jsonl = path, jsonl
        offsets, numbers = [], []
        with path.open("rb") as handle:
            position = 0
            for number, line in enumerate(handle, 1):
                if line.strip():
                    offsets.append(position)
                    numbers.append(number)
                position += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.numbers = np.asarray(numbers, dtype=np.int64)  # 1-based line numbers, for messages

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, rows: slice) -> list[str]:
        start, stop, _ = rows.indices(len(self.offsets))
        texts = []
        with self.path.open("rb") as handle:
            for number in range(start, stop):
                handle.seek(int(self.offsets[number]))
                raw = handle.readline()
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise InputError(f"calibration data {self.path}: line {self.numbers[number]} is not UTF-8 ({exc.reason}); "
                                     "save the texts as UTF-8") from exc
                texts.append(self._text(line, int(self.numbers[number])) if self.jsonl else line)
        return texts

    def _text(self, line: str, number: int) -> str:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"calibration data {self.path}: line {number} is not "
                             f"JSON ({first_line(exc)}); give one JSON object per line") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"calibration data {self.path}: line {number} has no "
                             f"\"text\" string (it has: {keys}); give each JSON line a \"text\" field")
        return text
