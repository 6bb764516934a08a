"""Every global random-number generator a process uses, captured and restored exactly.

The one module for it: the trainer's checkpoints (`rng/rank_NNNNN.pt`), the LoRA run's checkpoints (`rng.pt`),
the trainer's hooks and the evaluation (lm-eval reseeds python, numpy and torch) all go through these functions.

A captured state holds python's, numpy's (legacy global `np.random`), torch's CPU and, once CUDA is initialised,
every CUDA device's generator, as plain tensors, lists and numbers: a saved state loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from shortened.fsutil import atomic_torch_save


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _cuda_in_use() -> bool:
    # An uninitialised CUDA context has no generator state to keep; querying one would initialise it (a context on
    # every visible device) in a process that never meant to use the GPU.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rng_state() -> dict[str, Any]:
    """Plain tensors, lists and numbers only, so the file loads with `torch.load(weights_only=True)`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if _cuda_in_use():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back a state from `capture_rng_state` (or `load_rng_state`): the next draws of every generator are the
    ones that followed the capture."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(path: Path) -> None:
    """This process's generators into `path` (temp file, fsync, rename)."""
    atomic_torch_save(capture_rng_state(), path)


def load_rng_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever runs inside draws random numbers without changing the caller's random streams, even on error."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


@contextmanager
def preserved_rng_and_mode(model: torch.nn.Module, *, eval_mode: bool = False) -> Iterator[None]:
    """`preserved_rng`, and every module of `model` handed back in the train/eval mode it had, module by module.

    With `eval_mode`, the model is switched to eval() (no dropout) for the duration. The one guard for work that
    runs beside training (inline evaluation) and must leave no trace on it.
    """
    modes = [(module, module.training) for module in model.modules()]
    with preserved_rng():
        try:
            if eval_mode:
                model.eval()
            yield
        finally:
            for module, training in modes:
                module.training = training
