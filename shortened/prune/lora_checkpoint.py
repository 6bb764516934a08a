"""LoRA run checkpoints: adapter, optimizer, RNG and progress, complete or ignored.

A checkpoint is written into a hidden temporary directory, its `complete.json` marker last, and then renamed into
place: `checkpoints/step_NNNNNNNN/` either exists with everything in it or not at all, so a run killed at any
instant (kill -9 included) resumes from the newest directory that has the marker. Older checkpoints are deleted
only after a newer one is in place.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from shortened.fsutil import atomic_write_text, fsync_dir, fsync_tree

MARKER = "complete.json"
ADAPTER_FILE = "adapter_model.safetensors"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep_last` complete ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(root, step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # PEFT writes the adapter only: adapter_model.safetensors + adapter_config.json
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    fsync_tree(tmp)  # the data reaches the disk before the marker that vouches for it
    atomic_write_text(json.dumps({"step": step, "time": time.time()}), tmp / MARKER)
    if final.exists():  # a leftover of a run that died after this rename but before training went past it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a readable marker, oldest first; anything else is ignored."""
    found = []
    for path in sorted(root.glob("step_*")) if root.is_dir() else []:
        try:
            json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            warnings.warn(f"{path}: no readable {MARKER}; ignoring this incomplete checkpoint")
            continue
        found.append(path)
    return found


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG from `path`; returns its trainer_state.json."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(path / ADAPTER_FILE))
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter does not fit this model (unexpected {result.unexpected_keys[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
