"""One-shot or iterative depth pruning end to end: calibrate, score, choose, remove, save, report."""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from shortened.config import PruneConfig, to_dict
from shortened.prune.blocks import block_param_counts, decoder_layers, remove_blocks, skip_blocks
from shortened.prune.budget import blocks_to_remove
from shortened.prune.calibration import calibration_windows
from shortened.prune.hf_model import (
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
    save_model_dir,
    stored_dtype,
)
from shortened.prune.importance import GRADIENT_CRITERIA, perplexity
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


def prune(config: PruneConfig, command: str = "") -> dict:
    """Prune `config.model` into `config.out`; returns the report that is also written to prune_report.json."""
    started = time.time()
    model_dir = resolve_model_dir(config.model)
    if Path(config.out).resolve() == model_dir.resolve():
        raise ValueError(f"--out {config.out} is the source model's directory; pruning would overwrite it")
    tokenizer_source = Path(config.tokenizer) if config.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_source)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    windows = calibration_windows(
        config.calib, tokenizer, config.calib_samples, config.calib_len, config.seed, config.calib_field
    )
    # Taylor keeps fp32 weights so gradients accumulate in fp32; `dtype` then only sets the autocast precision.
    weights_dtype = torch.float32 if config.criterion in GRADIENT_CRITERIA else dtype
    model = load_causal_lm(model_dir, weights_dtype, device)
    num_blocks = len(decoder_layers(model))
    block_params = block_param_counts(model)
    params_before = sum(p.numel() for p in model.parameters())
    count = blocks_to_remove(num_blocks, params_before, block_params[0],
                             remove=config.remove, ratio=config.ratio, keep=config.keep_blocks)

    ppl_before = perplexity(model, windows, config.calib_batch_size, dtype)
    selection = select_blocks(
        model, windows, config.criterion, count,
        protect_first=config.protect_first, protect_last=config.protect_last,
        iterative=config.iterative, batch_size=config.calib_batch_size, dtype=dtype,
    )
    with skip_blocks(model, selection.removed):
        ppl_after = perplexity(model, windows, config.calib_batch_size, dtype)

    if weights_dtype != stored_dtype(model_dir):
        # Scoring precision must not become the saved precision: prune a fresh copy in the stored dtype.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = load_causal_lm(model_dir, "auto", torch.device("cpu"))
    remove_blocks(model, selection.removed)
    out = save_model_dir(model, config.out, tokenizer_source)

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
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report
