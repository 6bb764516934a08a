"""Checkpoints: complete or ignored, found, checked against the run, loaded on any world size, and pruned.

Layout (docs/architecture.md):

    run_dir/checkpoints/step_00001000/
        deepspeed/             DeepSpeed's model, optimizer and scheduler states (one optimizer shard per rank)
        universal/             the same states in DeepSpeed's universal format, made when the world size changed
        rng/rank_00000.pt      python / numpy / torch (/ cuda) generator states of each rank
        training_state.json    step, consumed samples, tokens, world size, config hash, run identity
        config.yaml            the resolved config that wrote it
        model_config.json      the Hugging Face config (architecture), tokenizer.model: for export
        model/                 a Hugging Face model (safetensors + tokenizer), with checkpoint.save_hf
        complete.json          written last, by rank 0, after every rank's files are on disk

A save writes everything, every rank flushes its files, a barrier, then rank 0 writes `complete.json`
(temp + fsync + rename). A directory without a valid marker is never loaded, exported or counted.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from shortened.config import ConfigError
from shortened.fsutil import (
    DISK_FULL_ERRNOS,
    LockHeld,
    atomic_write_json,
    discard_directory,
    disk_full_as_oserror,
    file_sizes,
    fsync_dir,
    fsync_file,
    fsync_tree,
    sealed_damage,
    take_lock,
)
from shortened.modeling import save_with_tokenizer
from shortened.rng import save_rng_state
from shortened.tokenizer import copy_tokenizer
from shortened.train.distributed import DistEnv, barrier
from shortened.train.failpoints import failpoint
from shortened.train.resume_rules import config_changes, rule_for

# CheckpointError and FORMAT_VERSION live with the state they describe; callers know them as checkpoint.*
from shortened.train.state import FORMAT_VERSION, CheckpointError, RunIdentity, TrainingState  # noqa: F401

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MARKER = "complete.json"
STATE_FILE = "training_state.json"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"
DEEPSPEED_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"
HF_DIR = "model"
_TAG = re.compile(r"^step_(\d{8,})$")
# The architecture fields of a Hugging Face config that weights depend on; a difference is a hard error.
ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @cached_property
    def state(self) -> TrainingState:
        """Read once; a file this trainer cannot read fully is a CheckpointError naming it."""
        return TrainingState.read(self.path / STATE_FILE)


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step of a `step_NNNNNNNN` directory."""
    match = _TAG.match(path.name)
    if match is None:
        raise ValueError(f"{path}: not a step_NNNNNNNN directory")
    return int(match.group(1))


def architecture(hf_config: dict[str, Any]) -> dict[str, Any]:
    return {key: hf_config[key] for key in ARCHITECTURE_KEYS if key in hf_config}


# ---------------------------------------------------------------------------------------------- one job per run dir

LOCK_FILE = ".train.lock"
_held_locks: dict[Path, Any] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on `run_dir` for the life of this process (rank 0).

    A job requeued while its previous incarnation still runs (or a second job started by mistake) would
    otherwise write into the same checkpoints. The kernel drops the lock when the process dies, however it dies.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _held_locks[run_dir] = take_lock(run_dir / LOCK_FILE)
    except LockHeld as held:
        raise CheckpointError(f"{run_dir} is in use by another training job ({held.holder}); wait for it to end or "
                              "choose another run_dir") from None
    except OSError as err:  # read-only, not ours, not a directory: the first write of the run tells
        if err.errno in DISK_FULL_ERRNOS:
            raise
        raise ConfigError(f"run_dir={run_dir}: cannot write there ({err.strerror}: {err.filename}); choose a "
                          "directory this job can write") from None


# ---------------------------------------------------------------------------------------------- finding


def marker_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    match = _TAG.match(path.name)
    if not match:
        return "not a step_NNNNNNNN directory"
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (its save never finished)"
    try:
        info = json.loads(marker.read_text())
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    if step != int(match.group(1)):
        return f"{MARKER} says step {step}"
    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    return None


def damage(checkpoint: Checkpoint) -> str | None:
    """What is missing or damaged in a complete checkpoint, checked cheaply (sizes against its marker), or None.

    A marker from before the file list only allows the readability checks.
    """
    path = checkpoint.path
    problem = sealed_damage(path, json.loads((path / MARKER).read_text()))
    if problem is not None:
        return problem
    for name in (STATE_FILE, CONFIG_FILE):
        try:
            (json.loads if name == STATE_FILE else yaml.safe_load)((path / name).read_text())
        except (OSError, ValueError, yaml.YAMLError) as err:
            return f"{path / name} is unreadable ({type(err).__name__})"
    if not (path / DEEPSPEED_TAG).is_dir():
        return f"{path / DEEPSPEED_TAG} is missing"
    return None


def scan(root: Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """Complete checkpoints (oldest first) and incomplete step directories with the reason."""
    complete: list[Checkpoint] = []
    incomplete: list[tuple[Path, str]] = []
    if not root.is_dir():
        return complete, incomplete
    for path in sorted(root.iterdir()):
        match = _TAG.match(path.name)
        if not match or not path.is_dir():
            continue
        problem = marker_problem(path)
        if problem is None:
            complete.append(Checkpoint(path, int(match.group(1))))
        else:
            incomplete.append((path, problem))
    complete.sort(key=lambda c: c.step)
    return complete, incomplete


def resolve_resume(resume: str, run_dir: Path) -> Checkpoint | None:
    """The checkpoint `resume` asks for: `auto` (newest complete, or None), `never` (None), or a path."""
    root = checkpoints_root(run_dir)
    complete, incomplete = scan(root)
    if resume == "never":
        if complete:
            raise CheckpointError(
                f"resume=never, but {root} holds complete checkpoints (newest {complete[-1].path.name}): "
                "starting over would mix two runs in one run_dir. Use resume=auto to continue it, "
                "or choose a new run_dir"
            )
        return None
    if resume == "auto":
        for path, problem in incomplete:
            log.warning("resume=auto ignores %s: %s", path, problem)
        if not complete:
            log.info("resume=auto: no complete checkpoint under %s, starting from model.init_from", root)
            return None
        return newest_undamaged(complete, root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: no such checkpoint directory (nothing to resume; "
                              "use resume=auto or resume=never to start a new run)")
    incomplete_because = marker_problem(path)
    if incomplete_because is not None:
        inside, _ = scan(path if path.name == CHECKPOINTS_DIR else path / CHECKPOINTS_DIR)
        hint = f"; did you mean {inside[-1].path}?" if inside else ""
        raise CheckpointError(f"resume={resume}: not a complete checkpoint ({incomplete_because}){hint}")
    chosen = Checkpoint(path.resolve(), step_of(path))
    damaged = damage(chosen)
    if damaged is not None:
        raise CheckpointError(f"resume={resume}: the checkpoint is damaged: {damaged}. Resume from another "
                              "checkpoint (resume=auto picks the newest undamaged one)")
    return chosen  # newer checkpoints of this run_dir are moved aside before training (train/branch.py)


def newest_undamaged(complete: list[Checkpoint], root: Path) -> Checkpoint:
    """The newest complete checkpoint whose files are intact; damaged newer ones are named in a warning."""
    for checkpoint in reversed(complete):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("resume=auto skips %s, which is damaged: %s", checkpoint.path.name, problem)
    raise CheckpointError(f"every complete checkpoint under {root} is damaged (see the warnings above); restore one, "
                          "or start a new run_dir")


def check_compatible(checkpoint: Checkpoint, identity: RunIdentity, new_config: dict[str, Any]) -> None:
    """Fail fast when architecture, sequence length or tokenizer differ; warn about other config changes.

    Reading the state refuses another format version first (TrainingState.from_dict).
    """
    saved = checkpoint.state.identity
    problems = []
    if saved.seq_len != identity.seq_len:
        problems.append(f"sequence length: checkpoint {saved.seq_len}, config data.seq_len={identity.seq_len}")
    if saved.tokenizer_sha256 != identity.tokenizer_sha256:
        problems.append(f"tokenizer: checkpoint sha256 {saved.tokenizer_sha256[:12]}..., shards in data.path "
                        f"{identity.tokenizer_sha256[:12]}...")
    for key in sorted(set(saved.architecture) | set(identity.architecture)):
        old, new = saved.architecture.get(key), identity.architecture.get(key)
        if old != new:
            problems.append(f"architecture {key}: checkpoint {old!r}, model.init_from {new!r}")
    if problems:
        raise CheckpointError(f"{checkpoint.path} does not match this run: " + "; ".join(problems)
                              + ". Resume with the config that wrote it, or start a new run_dir")
    if saved.data_fingerprint != identity.data_fingerprint:
        log.warning("%s was trained on other shards (fingerprint %s, data.path now has %s): the data order "
                    "continues by sample count, not by content", checkpoint.path, saved.data_fingerprint,
                    identity.data_fingerprint)
    check_config_changes(checkpoint, yaml.safe_load((checkpoint.path / CONFIG_FILE).read_text()), new_config)


def check_config_changes(checkpoint: Checkpoint, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
    """Refuse a change the resume cannot honour, naming the key and both values; log the honoured ones.

    A key the checkpoint's config lacks (it predates the key) is not a change.
    """
    changes = config_changes(old_config, new_config)
    refusals = []
    for key, (old, new) in changes.items():
        rule = rule_for(key)
        if rule.action == "refused":
            refusals.append(f"{key}: checkpoint {old!r}, config {new!r} ({rule.how})")
        elif rule.action == "honoured":
            log.info("resume changes %s: %r -> %r (%s)", key, old, new, rule.how)
    if refusals:
        raise CheckpointError(
            f"{checkpoint.path} cannot resume with these settings changed: " + "; ".join(refusals)
            + ". Resume with the checkpoint's values, or start a new run_dir (docs/training.md lists what may change)"
        )


def check_batch_position(checkpoint: Checkpoint, global_batch_size: int) -> None:
    consumed = checkpoint.state.consumed_samples
    if consumed % global_batch_size:
        raise CheckpointError(
            f"{checkpoint.path}: {consumed} samples consumed is not a multiple of train.global_batch_size="
            f"{global_batch_size}; resume with global_batch_size {checkpoint.state.global_batch_size} "
            "or one that divides the consumed samples"
        )


# ---------------------------------------------------------------------------------------------- world size


def universal_command(checkpoint: Checkpoint, output: Path) -> list[str]:
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
            "--input_folder", str(checkpoint.path / DEEPSPEED_TAG), "--output_folder", str(output)]


def ensure_universal(checkpoint: Checkpoint, policy: str) -> None:
    """Make `<checkpoint>/universal` (ZeRO states re-partitionable to any world size), or refuse with the command.

    The conversion writes to a temporary folder renamed into place, so a crash mid-way leaves nothing
    that looks finished.
    """
    target = checkpoint.path / UNIVERSAL_TAG
    if target.is_dir():
        return
    tmp = checkpoint.path / f".{UNIVERSAL_TAG}.tmp"
    if policy != "convert":
        command = " ".join(universal_command(checkpoint, tmp))
        raise CheckpointError(
            f"{checkpoint.path} was written by {checkpoint.state.world_size} ranks; its ZeRO optimizer state "
            f"must be converted for another world size (checkpoint.on_world_size_change=refuse). Run\n  {command} "
            f"&& mv {tmp} {target}\nor set checkpoint.on_world_size_change=convert"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("world size changed: converting %s to DeepSpeed's universal format", checkpoint.path.name)
    started = time.monotonic()
    result = subprocess.run(universal_command(checkpoint, tmp), capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"converting {checkpoint.path} to the universal format failed:\n"
                              f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    fsync_tree(tmp)
    tmp.rename(target)
    fsync_dir(checkpoint.path)
    log.info("universal checkpoint ready in %.1f s: %s", time.monotonic() - started, target)


def engine_load_location(checkpoint: Checkpoint, universal: bool) -> tuple[str, str]:
    """(load_dir, tag) for `engine.load_checkpoint`."""
    return str(checkpoint.path), UNIVERSAL_TAG if universal else DEEPSPEED_TAG


# ---------------------------------------------------------------------------------------------- saving


def write_rank0_files(path: Path, state: TrainingState, config_yaml: str, hf_config: dict[str, Any],
                      tokenizer_file: Path | None) -> None:
    atomic_write_json(state.to_dict(), path / STATE_FILE)
    (path / CONFIG_FILE).write_text(config_yaml)
    (path / MODEL_CONFIG_FILE).write_text(json.dumps(hf_config, indent=1, sort_keys=True))
    if tokenizer_file is not None:
        copy_tokenizer(tokenizer_file, path)


def flush_rank_files(path: Path, rank: int) -> None:
    """Each rank flushes what it wrote (DeepSpeed's torch.save does not fsync); rank 0 flushes everything else."""
    if rank == 0:
        fsync_tree(path)
        return
    for file in (path / DEEPSPEED_TAG).glob(f"*zero_pp_rank_{rank}_*"):
        fsync_file(file)


def write_marker(path: Path, step: int, tokens: int, consumed_samples: int) -> None:
    """The completion marker, listing every file of the checkpoint with its size so a resume can check it cheaply."""
    atomic_write_json({"step": step, "tokens": tokens, "consumed_samples": consumed_samples, "time": time.time(),
                       "files": file_sizes(path, MARKER)}, path / MARKER)


def discard(path: Path) -> None:
    """Remove a checkpoint directory: its marker first, so a crash half-way leaves it merely incomplete."""
    discard_directory(path, MARKER)


def apply_retention(root: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale incomplete ones.

    Called after a new checkpoint is complete, so a failed save can never leave fewer complete
    checkpoints than before it.
    """
    complete, incomplete = scan(root)
    removed = [c.path for c in complete[:-keep_last]]
    if complete:
        oldest_kept = complete[-keep_last:][0].step
        removed += [path for path, _ in incomplete if step_of(path) < oldest_kept]
    for path in removed:
        discard(path)
    for leftover in root.glob(".trash-*"):  # a deletion interrupted by a crash
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def save(engine, env: DistEnv, run_dir: Path, state: TrainingState, *, config_yaml: str, hf_config: dict[str, Any],
         tokenizer_file: Path | None, save_hf: bool, keep_last: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the complete checkpoint's directory."""
    root = checkpoints_root(run_dir)
    path = root / tag_for(state.step)
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by a save that died, or by a run resumed from an older checkpoint
            discard(path)
    barrier()
    # A full disk surfaces as torch.save's "unexpected pos ...", and on the ranks waiting for the one it stopped as
    # "connection closed": both are said for what they are.
    with disk_full_as_oserror(path):
        engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, save_latest=False)
        failpoint("checkpoint.after_engine_save", rank=env.rank, step=state.step)
        save_rng_state(path / "rng" / f"rank_{env.rank:05d}.pt")
        if env.is_main:
            write_rank0_files(path, state, config_yaml, hf_config, tokenizer_file)
            if save_hf:
                save_hf_model(engine.module, path / HF_DIR, tokenizer_file)
        flush_rank_files(path, env.rank)
        barrier()  # every rank's files are on disk
        if env.is_main:
            write_marker(path, state.step, state.tokens, state.consumed_samples)
            for old in apply_retention(root, keep_last):
                log.info("retention: removed %s", old.name)
        barrier()  # nobody runs after_checkpoint hooks before the marker exists
    return path


def save_hf_model(model, out: Path, tokenizer_file: Path | None) -> None:
    if tokenizer_file is None:
        model.save_pretrained(out, safe_serialization=True)
    else:
        save_with_tokenizer(model, out, tokenizer_file)
