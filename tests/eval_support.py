"""Helpers shared by the evaluation tests: tiny checkpoints on disk, small configs over the shared mirror."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import EVAL_DATA, TOKENIZER_MODEL

from shortened.config import EvalConfig
from shortened.modeling import build_tiny_llama, save_with_tokenizer

ZERO_SHOT = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def eval_config(tasks: list[str], limit: int = 8, **kwargs) -> EvalConfig:
    return EvalConfig(tasks=tasks, data_dir=str(EVAL_DATA), limit=limit, **kwargs)


def write_checkpoint(run_dir: Path, step: int, tokens: int, seed: int, complete: bool = True) -> Path:
    """A checkpoint as the trainer lays it out: checkpoints/step_NNNNNNNN/model/ (+ complete.json written last)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    save_with_tokenizer(build_tiny_llama(seed=seed, num_layers=2), path / "model", TOKENIZER_MODEL)
    if complete:
        (path / "complete.json").write_text(json.dumps({"step": step, "tokens": tokens, "consumed_samples": step,
                                                        "time": 0.0}))
    return path
