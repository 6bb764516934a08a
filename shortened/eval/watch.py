"""The checkpoint watcher: evaluate every complete checkpoint of a run exactly once, from another process or node.

A checkpoint counts only with its `complete.json` (written last by the trainer, see docs/architecture.md).
Exactly once across restarts: a checkpoint's rows are appended to results.jsonl in one write, then
`eval_state.json` is replaced atomically. A watcher killed between the two finds its rows on restart and
records the checkpoint without evaluating it again; one killed before the write left nothing and evaluates
it again. A lock file keeps a second watcher off the same run.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from shortened.config import ConfigError, EvalConfig, apply_override, from_dict
from shortened.eval.mirror import check_mirror
from shortened.eval.results import RESULTS_FILE, append_rows, failed_row, read_results, stamp
from shortened.eval.suite import EvalSuite
from shortened.eval.tasks import configured_tasks
from shortened.fsutil import atomic_write_json

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "complete.json"
STATE_FILE = "eval_state.json"
LOCK_FILE = "eval_watch.lock"
SOURCE = "watch"
# Variables by which a launcher (torchrun, deepspeed, SLURM) tells a process it is a rank of a job: a watcher
# started from inside a training job must not inherit them, or it would try to join that job's rendezvous.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "CROSS_RANK", "CROSS_SIZE",
                      "LOCAL_SIZE")


class WatchError(RuntimeError):
    """The watcher cannot work on this run directory; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    tag: str
    path: Path
    step: int
    tokens: int

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def complete_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Checkpoints with a readable complete.json and a model/ directory, by step; others are ignored."""
    found = []
    for marker in sorted(Path(run_dir, CHECKPOINTS_DIR).glob(f"*/{COMPLETE_MARKER}")):
        try:
            info = json.loads(marker.read_text())
            checkpoint = Checkpoint(marker.parent.name, marker.parent, int(info["step"]), int(info["tokens"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable completion marker (%s); ignoring that checkpoint", marker, err)
            continue
        if not checkpoint.model_dir.is_dir():
            log.warning("%s has no model/ (was checkpoint.save_hf off?); nothing the watcher can evaluate",
                        checkpoint.path)
            continue
        found.append(checkpoint)
    return sorted(found, key=lambda c: c.step)


class WatchState:
    """`eval_state.json`: checkpoint tag -> what became of it; rebuilt from results.jsonl when missing or bad."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self.results_path = run_dir / RESULTS_FILE
        self.evaluated: dict[str, dict[str, Any]] = self._load()
        self._reconcile()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            return dict(json.loads(self.path.read_text())["evaluated"])
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s is unreadable (%s); rebuilding it from %s", self.path, err, self.results_path)
            return {}

    def _reconcile(self) -> None:
        """Checkpoints whose rows reached results.jsonl count as evaluated even if the state write did not happen."""
        changed = False
        for row in read_results(self.results_path):
            tag = row.get("checkpoint")
            if row.get("source") == SOURCE and tag and tag not in self.evaluated:
                self.evaluated[tag] = {"step": row["step"], "tokens": row["tokens"], "time": row.get("time"),
                                       "recovered_from_results": True}
                changed = True
        if changed:
            self.save()

    def mark(self, checkpoint: Checkpoint, rows: list[dict[str, Any]]) -> None:
        failed = sorted({r["task"] for r in rows if r["status"] != "ok"})
        self.evaluated[checkpoint.tag] = {"step": checkpoint.step, "tokens": checkpoint.tokens,
                                          "time": time.time(), "failed_tasks": failed}
        self.save()

    def save(self) -> None:
        atomic_write_json({"version": 1, "evaluated": self.evaluated}, self.path)


def pending(checkpoints: Sequence[Checkpoint], state: WatchState, every_tokens: int = 0) -> list[Checkpoint]:
    """Checkpoints still to evaluate, oldest first.

    With `every_tokens` T only the first checkpoint of each interval [kT, (k+1)T) is evaluated; the others are
    skipped for good (the rule depends only on the checkpoints, so a restarted watcher makes the same choice).
    """
    todo = [c for c in checkpoints if c.tag not in state.evaluated]
    if not every_tokens:
        return todo
    taken = {info["tokens"] // every_tokens for info in state.evaluated.values()}
    chosen = []
    for checkpoint in todo:
        bucket = checkpoint.tokens // every_tokens
        if bucket not in taken:
            taken.add(bucket)
            chosen.append(checkpoint)
    return chosen


def load_model(checkpoint: Checkpoint, device: str, dtype: str = "auto") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(checkpoint.model_dir, dtype=dtype)  # .to() is mistyped
    return model.to(device)


def evaluate_checkpoint(checkpoint: Checkpoint, config: EvalConfig, run_name: str, device: str,
                        dtype: str = "auto", validation_path: str = "") -> list[dict[str, Any]] | None:
    """The checkpoint's stamped rows; a checkpoint that cannot be loaded gives a failed row, one that vanished
    (rotated away by the trainer) before it was loaded gives None."""
    start = time.perf_counter()
    try:
        model = load_model(checkpoint, device, dtype)
        rows = EvalSuite(config, checkpoint.model_dir, validation_path=validation_path).run(model)
    except Exception:
        if not (checkpoint.path / COMPLETE_MARKER).is_file():
            log.warning("%s was deleted while loading (checkpoint rotation); not recording it", checkpoint.path)
            return None
        error = traceback.format_exc()
        log.error("checkpoint %s could not be evaluated:\n%s", checkpoint.path, error)
        rows = [failed_row("evaluation", "-", error, time.perf_counter() - start)]
    return stamp(rows, run=run_name, step=checkpoint.step, tokens=checkpoint.tokens, source=SOURCE,
                 checkpoint=checkpoint.tag)


def watch(run_dir: str | Path, config: EvalConfig, every_tokens: int = 0, once: bool = False,
          device: str | None = None, dtype: str = "auto", validation_path: str = "") -> int:
    """Poll `run_dir` and evaluate new complete checkpoints; with `once`, stop when none is left. Returns how many."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WatchError(f"{run_dir}: no such run directory (pass the trainer's run_dir to --run)")
    # A typo or a missing mirror stops the watcher now, instead of marking every checkpoint failed.
    check_mirror(config.data_dir, configured_tasks(config, validation_path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    done = 0
    with _exclusive(run_dir):
        state = WatchState(run_dir)
        while True:
            for checkpoint in pending(complete_checkpoints(run_dir), state, every_tokens):
                log.info("evaluating %s (step %d, %d tokens)", checkpoint.tag, checkpoint.step, checkpoint.tokens)
                rows = evaluate_checkpoint(checkpoint, config, run_dir.name, device, dtype, validation_path)
                if rows is None:
                    continue
                append_rows(run_dir / RESULTS_FILE, rows)
                state.mark(checkpoint, rows)
                done += 1
                log.info("recorded %s: %d rows", checkpoint.tag, len(rows))
            if once:
                return done
            time.sleep(config.poll_s)


def load_watch_config(run_dir: str | Path, config_file: str | Path | None = None,
                      overrides: Sequence[str] = ()) -> tuple[EvalConfig, str]:
    """The `eval:` section and `data.validation_path` of the run's config.yaml (or of `config_file`), with
    `eval.key=value` / `data.validation_path=DIR` overrides."""
    path = Path(config_file) if config_file else Path(run_dir) / "config.yaml"
    loaded: dict[str, Any] = {}
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping with an 'eval:' section")
    elif config_file:
        raise ConfigError(f"{path}: no such config file")
    validation_path = (loaded.get("data") or {}).get("validation_path", "")
    raw = {"eval": loaded.get("eval") or {}, "data": {"validation_path": validation_path}}
    for item in overrides:
        if not (item.startswith("eval.") or item.startswith("data.validation_path=")):
            raise ConfigError(f"override {item!r}: the watcher takes eval.<key>=<value> and data.validation_path=<dir>")
        apply_override(raw, item)
    source = f"{path}" + (f" + overrides {' '.join(overrides)}" if overrides else "")
    return from_dict(EvalConfig, raw["eval"], source=source, prefix="eval."), str(raw["data"]["validation_path"] or "")


def clean_launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the launcher's rank variables (see LAUNCHER_VARIABLES)."""
    env = dict(os.environ if env is None else env)
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)
    return env


def spawn_watcher(run_dir: str | Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                  **popen_kwargs) -> subprocess.Popen:
    """Start `launch/eval_watch.py --run run_dir` as a detached child that never joins the trainer's rendezvous.

    For eval.mode=watch on the trainer's node; on other nodes or GPUs start launch/eval_watch.py yourself.
    """
    script = Path(__file__).resolve().parents[2] / "launch" / "eval_watch.py"
    return subprocess.Popen([sys.executable, str(script), "--run", str(run_dir), *args],
                            env=clean_launcher_env(env), start_new_session=True, **popen_kwargs)


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WatchError(f"{run_dir / LOCK_FILE}: another watcher is evaluating this run; stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
