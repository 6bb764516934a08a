"""Helpers shared by the evaluation tests: tiny checkpoints on disk, small configs over the shared mirror."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from shortened.config import EvalConfig
from shortened.modeling import build_tiny_llama, save_with_tokenizer

from conftest import EVAL_DATA, TOKENIZER_MODEL

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


def dist_worker(out_dir: str, config_json: str, validation_path: str) -> None:
    """One rank of the sharded-evaluation test: gloo over the launcher's env, the suite, rows to rank<N>.json."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from shortened.eval.dist import EvalGroups
    from shortened.eval.suite import EvalSuite

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    config = EvalConfig(**json.loads(config_json))
    groups = EvalGroups.from_default_group(config.collective_timeout_s)
    rows = EvalSuite(config, TOKENIZER_MODEL, groups, validation_path).run(build_tiny_llama(seed=11, num_layers=2))
    Path(out_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


if __name__ == "__main__":  # a rank of tests/test_eval_dist.py: OUT_DIR CONFIG_JSON VALIDATION_PATH
    dist_worker(*sys.argv[1:])
