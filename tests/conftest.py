"""Shared fixtures: where the committed sample models live, their manifest and calibration data,
and helpers that state what "the model and the process are handed back as they came" means."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (test_triton_stats.py).
# Triton reads this once, when it is first imported, so it is set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
ARCHITECTURES = SAMPLES / "architectures.py"
CALIB = SAMPLES / "digits_calib.npz"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    return json.loads((SAMPLES / "manifest.json").read_text())


@pytest.fixture(scope="session")
def calib_path() -> Path:
    return CALIB


@pytest.fixture(scope="session")
def calib_x() -> np.ndarray:
    with np.load(CALIB) as archive:
        return archive["x"].copy()


def arch_spec(factory: str) -> str:
    """--arch value for one of the committed architectures."""
    return f"{ARCHITECTURES}:{factory}"


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for subprocess runs: the venv's bin first, no colour codes, a wide terminal."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env.pop("FORCE_COLOR", None)
    return env


def global_hook_state() -> dict[str, int]:
    """Sizes of torch's process-wide module hook tables and of the TorchFunctionMode stack."""
    import torch
    import torch.nn.modules.module as module_mod
    from torch.overrides import _get_current_function_mode_stack

    tables = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
              "_global_forward_hooks_with_kwargs", "_global_backward_hooks", "_global_backward_pre_hooks")
    state = {name: len(getattr(module_mod, name)) for name in tables if hasattr(module_mod, name)}
    state["function_mode_stack"] = len(_get_current_function_mode_stack())
    state["torch_function_stack"] = int(torch._C._len_torch_function_stack())
    return state


def module_hook_state(model: Any) -> dict[str, tuple[int, ...]]:
    """Per-module hook dictionaries, by qualname, as ids of the registered hooks."""
    out = {}
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_always_called", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            table = getattr(module, attr, None)
            if table is not None:
                out[f"{name}:{attr}"] = tuple(sorted(table))
    return out


@pytest.fixture
def clean_global_state():
    """Asserts that a test leaves torch's global hook tables and mode stack as it found them (empty)."""
    before = global_hook_state()
    assert all(v == 0 for v in before.values()), f"global state dirty before the test: {before}"
    yield
    after = global_hook_state()
    assert after == before, f"global hook/mode state left behind: {after}"
