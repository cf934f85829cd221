"""Hugging Face model folders: `config.json` + weights (+ tokenizer files), loaded with `transformers`.

`transformers` is an optional extra (`pip install "reluscope[hf]"`), imported only here and only
when a folder is analysed. Nothing is downloaded: every file comes from the folder
(`local_files_only=True`), and a missing one is an input error. Weights load as data
(safetensors, or `.bin` with transformers' `weights_only=True`); a config that names custom model
code (`auto_map`, code that would run from the folder) needs --trust-checkpoint.

The folder's tokenizer turns text calibration data (.txt, .jsonl) into the model's inputs: see
`HfTokenizer`, handed to the data source through `LoadedModel.tokenizer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ...errors import InputError, UnsafeCheckpointError, UsageError, first_line
from ..base import LoadedModel
from .weight_files import INDEX_NAMES, read_weight_map

INSTALL_HINT = 'pip install "reluscope[hf]"'
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", *INDEX_NAMES)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def _transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise UsageError(f"{what} needs the transformers package, which is not installed; install it with "
                         f"{INSTALL_HINT}") from exc
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' own logging and progress bars kept off stderr (one line per outcome is the contract);
    what matters (weights it had to initialise) is reported as a warning instead."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {first_line(exc)}; the folder's config.json must be the JSON "
                         "save_pretrained writes") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object; the folder's config.json must be the JSON save_pretrained "
                         "writes")
    return config


def _weight_files(folder: Path) -> list[Path]:
    """The folder's weight files (every shard of an index), or an input error naming what is missing."""
    index = next((folder / name for name in INDEX_NAMES if (folder / name).is_file()), None)
    if index is not None:
        shards = sorted(set(read_weight_map(index).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise InputError(f"Hugging Face model folder {folder}: {index.name} lists {len(shards)} shards but "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                             f"{'is' if len(missing) == 1 else 'are'} missing; copy every shard into the folder "
                             "(reluscope never downloads)")
        return [index, *(folder / name for name in shards)]
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise InputError(f"Hugging Face model folder {folder} has no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                         "copy them into the folder (reluscope never downloads)")
    return found[:1]


def _digest(files: list[Path]) -> str:
    """sha256 over the config and weight files, each as its name and bytes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_hf_folder(folder: Path, *, trust_checkpoint: bool) -> LoadedModel:
    config_dict = _read_config(folder)
    weights = _weight_files(folder)
    custom = config_dict.get("auto_map")
    if custom and not trust_checkpoint:
        raise UnsafeCheckpointError(
            f"refused to load {folder}: its config.json names custom model code (auto_map), Python that would run "
            "from the folder. Pass --trust-checkpoint only if you trust its source")
    transformers = _transformers(f"the Hugging Face model folder {folder}")
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                             trust_remote_code=bool(custom))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"transformers cannot read {folder / 'config.json'}: {first_line(exc)}; check the "
                             "folder's model_type (or upgrade transformers)") from exc
        model_class = _model_class(transformers, config, custom)
        try:
            model, info = model_class.from_pretrained(str(folder), config=config, local_files_only=True,
                                                      trust_remote_code=bool(custom), output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise InputError(f"transformers cannot load the weights of {folder}: {first_line(exc)}; the weights may "
                             "be damaged or of another architecture, re-save the model") from exc
    model.eval()
    loaded = LoadedModel(model, "huggingface", tokenizer=HfTokenizer(folder, _accepted_inputs(model)))
    missing = list((info or {}).get("missing_keys") or [])
    if missing:
        loaded.notes.append(f"{len(missing)} weights of {type(model).__name__} are not in {folder} and were "
                            f"initialised at random ({', '.join(sorted(missing)[:5])}{' ...' if len(missing) > 5 else ''})"
                            "; their layers' statistics say nothing about the trained model")
    loaded.sha256 = _digest([folder / "config.json", *weights])
    return loaded


def _model_class(transformers: Any, config: Any, custom: Any) -> Any:
    """The class the config names (`architectures`), where transformers has it; AutoModel otherwise."""
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if custom and names:
        return transformers.AutoModel if "AutoModel" in custom else transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _accepted_inputs(model: torch.nn.Module) -> set[str] | None:
    """The forward's keyword inputs (tokenizers may return some the model does not take); None: any."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


class HfTokenizer:
    """The folder's tokenizer, loaded on first use (only text calibration data needs it)."""

    def __init__(self, folder: Path, accepted: set[str] | None) -> None:
        self.folder = folder
        self.accepted = accepted
        self._tokenizer: Any = None

    def _load(self) -> Any:
        if self._tokenizer is None:
            if not any((self.folder / name).is_file() for name in TOKENIZER_FILES):
                raise InputError(f"Hugging Face model folder {self.folder} has no tokenizer files "
                                 f"({', '.join(TOKENIZER_FILES[:3])}...) to read text calibration data with; copy "
                                 "them into the folder, or give token ids as .npz (input_ids, attention_mask)")
            transformers = _transformers("text calibration data")
            with _quiet(transformers):
                try:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise InputError(f"cannot load the tokenizer of {self.folder}: {first_line(exc)}; check its "
                                     "tokenizer files") from exc
            if tokenizer.pad_token is None:  # GPT-style tokenizers: padding is masked out anyway
                if tokenizer.eos_token is None:
                    raise InputError(f"the tokenizer of {self.folder} has no padding token (nor an end-of-text "
                                     "token to pad with); give token ids as .npz (input_ids, attention_mask)")
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizer = tokenizer
        return self._tokenizer

    def check(self) -> None:
        """Fail early (before the model runs) if the folder cannot tokenize."""
        self._load()

    def encode(self, texts: list[str], max_length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the model's inputs, the attention mask) for `texts`: token ids padded to the longest text
        of the batch, truncated to `max_length` tokens; the mask is True at real tokens."""
        tokenizer = self._load()
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {key: value for key, value in encoded.items() if self.accepted is None or key in self.accepted}
        mask = encoded.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(encoded["input_ids"])
        return inputs, mask.to(torch.bool)
