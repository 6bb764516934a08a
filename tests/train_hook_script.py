"""`launch/cpt.py` with a hook that behaves like an inline evaluator, for the trainer's distributed tests.

The hook runs a forward pass in eval mode and draws random numbers at every step, and records what it was
given on each rank to RUN_DIR/hook_rank<R>.jsonl.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortened.train.cli import cpt_main  # noqa: E402


class RecordingHook:
    def before_training(self, ctx) -> None:
        self._record(ctx, {"event": "start", "tokenizer": str(ctx.tokenizer_file)})

    def after_step(self, ctx) -> None:
        ctx.model.eval()
        with torch.no_grad():
            logits = ctx.model(input_ids=torch.tensor([[1, 306, 626, 263]], device=ctx.model.device)).logits
        torch.rand(7), torch.randn(3)
        self._record(ctx, {"event": "step", "finite": bool(torch.isfinite(logits).all())})

    def after_checkpoint(self, ctx) -> None:
        self._record(ctx, {"event": "checkpoint", "checkpoint": str(ctx.checkpoint),
                           "complete": (ctx.checkpoint / "complete.json").is_file()})

    @staticmethod
    def _record(ctx, fields: dict) -> None:
        line = {"step": ctx.step, "tokens": ctx.tokens, "rank": ctx.rank, "world_size": ctx.world_size, **fields}
        with open(Path(ctx.run_dir) / f"hook_rank{ctx.rank}.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(cpt_main(hooks=[RecordingHook()]))
