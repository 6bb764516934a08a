"""A run dir describes one branch: whatever it holds past the step a run resumes from is moved aside, not mixed in.

A resume re-does every step after its checkpoint. Before, the train log's rows past that step were deleted, the
results rows were kept (the re-done step's evaluation then appeared twice), and after a resume by path the newer
checkpoints of the abandoned continuation stayed where `resume=auto` would pick them: run to step 10, resume from
step 6 to step 8, then `resume=auto` went on from the old step 10, and the log held steps 7-8 of one branch under
steps 11-12 of the other. Now rank 0 moves all of it (log rows, results rows, the watcher's bookkeeping of those
checkpoints, the newer checkpoints themselves) into `run_dir/set_aside/after_step_NNNNNNNN.<time>/` before training,
so the run dir holds exactly the branch being trained, and nothing is lost.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from shortened.eval.results import RESULTS_FILE
from shortened.fsutil import atomic_write_json, atomic_write_text, fsync_dir, truncate_log
from shortened.train.checkpoint import CHECKPOINTS_DIR, Checkpoint, scan, tag_for
from shortened.train.metrics import TRAIN_LOG

log = logging.getLogger(__name__)

SET_ASIDE_DIR = "set_aside"
WATCH_STATE = "eval_state.json"  # the eval watcher's bookkeeping (shortened/eval/watch.py): checkpoint tag -> row


@dataclass
class SetAside:
    """What one resume moved out of the run dir, and where to."""

    folder: Path
    log_rows: list[int] = field(default_factory=list)  # steps of the moved train-log rows
    results_rows: int = 0
    checkpoints: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.log_rows:
            parts.append(f"train_log rows of steps {self.log_rows[0]}-{self.log_rows[-1]}")
        if self.results_rows:
            parts.append(f"{self.results_rows} results rows")
        if self.checkpoints:
            parts.append("checkpoints " + ", ".join(self.checkpoints))
        return ", ".join(parts)


def set_aside_past(run_dir: Path, step: int) -> SetAside | None:
    """Rank 0, before training from `step`: move every record of a later step out of `run_dir` (see the module's
    doc); None when there was none. Each file is rewritten atomically after its rows are safe in the new folder."""
    folder = run_dir / SET_ASIDE_DIR / f"after_{tag_for(step)}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    moved = SetAside(folder)
    log_rows = _move_rows(run_dir / TRAIN_LOG, step, folder)
    moved.log_rows = [json.loads(row)["step"] for row in log_rows]
    moved.results_rows = len(_move_rows(run_dir / RESULTS_FILE, step, folder))
    newer = [checkpoint for checkpoint in scan(run_dir / CHECKPOINTS_DIR)[0] if checkpoint.step > step]
    _forget_watched(run_dir / WATCH_STATE, {checkpoint.path.name for checkpoint in newer}, folder)
    moved.checkpoints = [_move_checkpoint(checkpoint, folder) for checkpoint in newer]
    if not (moved.log_rows or moved.results_rows or moved.checkpoints):
        return None
    log.warning("resuming from step %d: moved what lay past it aside into %s: %s", step, folder, moved.describe())
    return moved


def _move_rows(path: Path, step: int, folder: Path) -> list[str]:
    """Rows of `path` (JSON lines with a `step`) past `step`, written to `folder` before they leave `path`."""
    past = [line for line in _lines(path) if _step(line) > step]
    if past:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text("".join(line + "\n" for line in past), folder / path.name)
        truncate_log(path, step)
    return past


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a line cut by a crash: truncate_log drops it


def _forget_watched(state_file: Path, tags: set[str], folder: Path) -> None:
    """The watcher keys what it evaluated by checkpoint tag: forget the moved checkpoints, so the new branch's
    checkpoints of the same steps are evaluated (their rows were moved with the rest)."""
    if not tags or not state_file.is_file():
        return
    try:
        state = json.loads(state_file.read_text())
        evaluated = state["evaluated"]
    except (ValueError, KeyError, TypeError):
        return  # the watcher rebuilds an unreadable state from results.jsonl
    forgotten = {tag: evaluated.pop(tag) for tag in sorted(tags & set(evaluated))}
    if forgotten:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json({"version": state.get("version", 1), "evaluated": forgotten}, folder / WATCH_STATE)
        atomic_write_json(state, state_file)


def _move_checkpoint(checkpoint: Checkpoint, folder: Path) -> str:
    target = folder / CHECKPOINTS_DIR / checkpoint.path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.path.rename(target)  # one file system: the run dir's; a rename moves it whole or not at all
    fsync_dir(checkpoint.path.parent)
    fsync_dir(target.parent)
    return checkpoint.path.name
