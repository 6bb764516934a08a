"""LoRA run checkpoints: adapter, optimizer, RNG and progress, complete or ignored.

The trainer's commit protocol (`shortened.fsutil`, sealed directories): `checkpoints/step_NNNNNNNN/` gets its
files, they are flushed, and its `complete.json` marker is written last, listing every file with its size. A run
killed at any instant (kill -9 included) resumes from the newest directory whose marker is valid and whose files
match it; a directory without one is ignored, and replaced when training reaches its step again. Older checkpoints
are deleted (marker first) only after a newer one is complete.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from shortened.fsutil import discard_directory, read_marker, seal_directory, sealed_damage
from shortened.rng import capture_rng_state, load_rng_state, restore_rng_state

if TYPE_CHECKING:  # peft is imported when LoRA runs
    from peft import PeftModel

MARKER = "complete.json"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
_TAG = re.compile(r"^step_(\d{8,})$")


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: PeftModel, optimizer: torch.optim.Optimizer, state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` (marker last), then drop all but the newest `keep_last` complete ones."""
    root.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(root, step)
    if path.exists():  # left by a save that died, or by a run resumed from an older checkpoint
        discard_directory(path, MARKER)
    path.mkdir()
    model.save_pretrained(str(path))  # PEFT writes the adapter only: adapter_model.safetensors + adapter_config.json
    torch.save(optimizer.state_dict(), path / OPTIMIZER_FILE)
    torch.save(capture_rng_state(), path / RNG_FILE)
    (path / STATE_FILE).write_text(json.dumps(state, indent=2))
    seal_directory(path, MARKER, {"step": step, "time": time.time()})
    apply_retention(root, keep_last)
    return path


def incomplete_because(path: Path) -> str | None:
    """Why the step directory `path` is not a usable checkpoint, or None when it is."""
    match = _TAG.match(path.name)
    if match is None or not path.is_dir():
        return "not a step_NNNNNNNN directory"
    info = read_marker(path, MARKER)
    if info is None:
        return f"no readable {MARKER} (its save never finished)"
    if info.get("step") != int(match.group(1)):
        return f"{MARKER} says step {info.get('step')}"
    return sealed_damage(path, info)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a valid marker and intact files, oldest first; anything else is ignored."""
    found = []
    for path in sorted(root.glob("step_*")) if root.is_dir() else []:
        problem = incomplete_because(path)
        if problem is not None:
            warnings.warn(f"{path}: {problem}; ignoring this incomplete checkpoint")
            continue
        found.append(path)
    return found


def apply_retention(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and incomplete ones older than those."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # incomplete directories are expected here: a resume replaces them
        complete = complete_checkpoints(root)
    kept = complete[-keep_last:]
    if not kept:
        return
    for path in sorted(root.glob("step_*")):
        if path.is_dir() and path not in kept and path.name < kept[0].name:
            discard_directory(path, MARKER)
    remove_leftovers(root)


def remove_leftovers(root: Path) -> None:
    """What interrupted deletions (`.trash-*`) and saves of earlier versions (`.step_*.tmp`) left behind."""
    for leftover in [*root.glob(".trash-*"), *root.glob(".step_*.tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path, model: PeftModel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG from `path`; returns its trainer_state.json."""
    from peft import set_peft_model_state_dict

    result: Any = set_peft_model_state_dict(model, load_file(path / ADAPTER_FILE))  # load_state_dict's named tuple
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter does not fit this model (unexpected {result.unexpected_keys[:3]})")
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
    rng = load_rng_state(path / RNG_FILE)
    if "numpy" in rng:
        restore_rng_state(rng)
    else:  # written before checkpoints captured numpy: python's state as a tuple, torch's, cuda's
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text())
