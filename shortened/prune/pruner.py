"""One-shot or iterative depth pruning end to end: calibrate, score, choose, remove, save, report."""
from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import torch

from shortened.config import PruneConfig, to_dict
from shortened.prune.blocks import block_param_counts, remove_blocks, skip_blocks
from shortened.prune.budget import blocks_to_remove
from shortened.prune.calibration import calibration_windows
from shortened.prune.errors import PruneInputError
from shortened.prune.hf_model import (
    load_causal_lm,
    model_shape,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
    save_model_dir,
    stored_dtype,
)
from shortened.prune.importance import perplexity
from shortened.prune.selection import select_blocks
from shortened.tokenizer import load_tokenizer

REPORT_NAME = "prune_report.json"
REPORT_VERSION = 1
SCORE_MEANING = {
    "ppl": "calibration perplexity with the block skipped",
    "taylor": "sum over the block's weights of |W * dL/dW| (fp32 gradient of the mean calibration loss)",
    "magnitude": "sum of |W| over the block",
    "bi": "1 - cos(block input, block output), mean over calibration tokens",
    "angular": "(1/pi) arccos cos(input of block l, output of block l+n-1) at the final token, mean over samples; "
               "listed at the run start l (null where no run of n fits)",
}


def prune(config: PruneConfig, command: str = "", overwrite: bool = False) -> dict:
    """Prune `config.model` into `config.out`; returns the report that is also written to prune_report.json.

    `config.out` must be new or empty; `overwrite` lets it replace a model directory there (never the source).
    """
    started = time.time()
    model_dir = resolve_model_dir(config.model)
    check_out_dir(Path(config.out), model_dir, overwrite)
    num_blocks, total_params, first_block_params = model_shape(model_dir)
    count = blocks_to_remove(num_blocks, total_params, first_block_params, remove=config.remove, ratio=config.ratio,
                             keep=config.keep_blocks, protect_first=config.protect_first,
                             protect_last=config.protect_last)
    tokenizer_source = Path(config.tokenizer) if config.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_source)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    windows = calibration_windows(
        config.calib, tokenizer, config.calib_samples, config.calib_len, config.seed, config.calib_field
    )
    # Every criterion, taylor included, scores the model in `dtype`: taylor makes one block at a time fp32 itself.
    model = load_causal_lm(model_dir, dtype, device)
    block_params = block_param_counts(model)
    params_before = sum(p.numel() for p in model.parameters())

    ppl_before = perplexity(model, windows, config.calib_batch_size, dtype)
    selection = select_blocks(
        model, windows, config.criterion, count,
        protect_first=config.protect_first, protect_last=config.protect_last,
        iterative=config.iterative, batch_size=config.calib_batch_size, dtype=dtype,
    )
    with skip_blocks(model, selection.removed):
        ppl_after = perplexity(model, windows, config.calib_batch_size, dtype)

    if dtype != stored_dtype(model_dir):
        # Scoring precision must not become the saved precision: prune a fresh copy in the stored dtype.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = load_causal_lm(model_dir, "auto", torch.device("cpu"))
    remove_blocks(model, selection.removed)
    staging = _staging_dir(Path(config.out))
    save_model_dir(model, staging, tokenizer_source)

    report = {
        "format_version": REPORT_VERSION,
        "model": str(config.model),
        "criterion": config.criterion,
        "iterative": config.iterative,
        "score_meaning": SCORE_MEANING[config.criterion] + "; lower is removed first",
        "scores": selection.scores,
        "rounds": [{"scores": {str(b): s for b, s in r["scores"].items()}, "removed": r["removed"]}
                   for r in selection.rounds],
        "removed_blocks": sorted(selection.removed),
        "removal_order": selection.removed,
        "kept_blocks": [b for b in range(num_blocks) if b not in selection.removed],
        "num_blocks_before": num_blocks,
        "num_blocks_after": num_blocks - len(selection.removed),
        "params_before": params_before,
        "params_after": params_before - sum(block_params[b] for b in selection.removed),
        "calib_ppl_before": ppl_before,
        "calib_ppl_after": ppl_after,
        "calibration": {"path": str(config.calib), "samples": config.calib_samples, "length": config.calib_len,
                        "field": config.calib_field, "tokenizer_sha256": tokenizer.sha256},
        "seed": config.seed,
        "protect_first": config.protect_first,
        "protect_last": config.protect_last,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "config": to_dict(config),
        "command": command,
        "time_s": round(time.time() - started, 2),
    }
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    _move_into_place(staging, Path(config.out))
    return report


def check_out_dir(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse an --out whose files pruning would destroy: the source model (or a directory holding it), any
    non-empty directory without `overwrite`, and with it anything that is not a model directory."""
    resolved = out.resolve()
    if resolved == model_dir.resolve() or resolved in model_dir.resolve().parents:
        raise PruneInputError(f"--out {out} is or contains the source model {model_dir}; pruning would overwrite "
                              "it: choose another --out")
    if out.exists() and not out.is_dir():
        raise PruneInputError(f"--out {out} is a file, not a directory: choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    listing = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
        raise PruneInputError(f"--out {out} is not empty ({listing}): choose a new or empty directory, or pass "
                              "--overwrite to replace the model in it")
    if not (out / "config.json").is_file():
        raise PruneInputError(f"--out {out} holds {listing} but no config.json, so it is not a model directory "
                              "--overwrite may replace: choose a new or empty directory")


def _staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of `out`: the model and report are written there, then moved into place whole."""
    staging = out.parent / f".{out.name}.pruning"
    shutil.rmtree(staging, ignore_errors=True)  # the leftover of a killed run
    staging.parent.mkdir(parents=True, exist_ok=True)
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` by `staging` so no file of an older model stays beside the new one (a stale shard index
    would be loaded instead of it); the old directory is deleted only once the new one is in place."""
    old = out.parent / f".{out.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
