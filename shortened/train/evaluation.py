"""Evaluation during training, from the run config's `eval:` section.

`eval.mode: inline` evaluates the model in memory on every rank (work sharded over the data-parallel ranks) at the
`eval.every_tokens` / `eval.every_steps` points, plus once before the first step of a new run so every curve
starts at the pruned model. `eval.mode: watch` leaves evaluation to `launch/eval_watch.py`, which reads this run's
complete checkpoints from another process, GPU or node and costs the training job nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from shortened.config import ConfigError, RunConfig
from shortened.eval.results import RESULTS_FILE, read_results
from shortened.train.distributed import broadcast_object
from shortened.train.hooks import StepContext, TrainerHook

if TYPE_CHECKING:  # the evaluation stack (lm-eval, datasets) is imported only when inline evaluation is on
    from shortened.eval.hook import InlineEvaluator

log = logging.getLogger(__name__)


class InlineEvaluation(TrainerHook):
    """A trainer hook around `shortened.eval.hook.InlineEvaluator` (RNG states and module modes are restored by
    `call_hooks` around every hook, and the evaluator records failing tasks instead of raising)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.evaluator: InlineEvaluator | None = None

    def before_training(self, ctx: StepContext) -> None:
        from shortened.eval.hook import InlineEvaluator

        if ctx.tokenizer_file is None:
            raise ConfigError("eval.mode=inline: the model in model.init_from has no tokenizer.model or tokenizer.json "
                              "to score with")
        # Collective, and a bad task name raises here: before any compute is spent on training.
        self.evaluator = InlineEvaluator(self.config.eval, ctx.run_dir, ctx.tokenizer_file,
                                         validation_path=self.config.data.validation_path)
        missed = ctx.step > 0 and self.missed_at_resume(ctx.step, ctx.tokens, ctx.step_tokens, ctx.run_dir, ctx.rank)
        if missed and ctx.rank == 0:
            log.warning("the evaluation at step %d has no rows in %s (the job stopped while it ran): evaluating it "
                        "now", ctx.step, self.evaluator.results_path)
        if ctx.step == 0 or missed:
            self.evaluator(ctx.model, ctx.step, ctx.tokens)

    def missed_at_resume(self, step: int, tokens: int, step_tokens: int, run_dir: Path, rank: int) -> bool:
        """Whether the checkpoint this run resumes from was an evaluation point that has no rows: the job stopped
        after saving it, while that evaluation ran (a preemption, a kill). The weights are the step's own, so
        evaluating now gives the rows it would have written; without this the point would be silently lost (the
        last one too: the trainer builds the engine of a run with nothing left to train for it). Collective."""
        if not self.config.eval.is_inline_point(step, tokens, step_tokens):
            return False
        missing = rank == 0 and not any(row.get("step") == step and row.get("source") == "inline"
                                        for row in read_results(run_dir / RESULTS_FILE))
        if dist.is_initialized():  # rank 0 reads results.jsonl; every rank must take the same branch
            missing = bool(broadcast_object(missing))
        return missing

    def after_step(self, ctx: StepContext) -> None:
        if self.evaluator is not None and self.config.eval.is_inline_point(ctx.step, ctx.tokens, ctx.step_tokens):
            self.evaluator(ctx.model, ctx.step, ctx.tokens)


class WatchNotice(TrainerHook):
    """eval.mode=watch: say, once, how to start the watcher for this run."""

    def before_training(self, ctx: StepContext) -> None:
        if ctx.rank == 0:
            log.info("eval.mode=watch: evaluate this run's checkpoints with "
                     "`python launch/eval_watch.py --run %s` (on another GPU or node)", ctx.run_dir)


def evaluation_hooks(config: RunConfig) -> list[TrainerHook]:
    if config.eval.mode == "inline":
        return [InlineEvaluation(config)]
    if config.eval.mode == "watch":
        return [WatchNotice()]
    return []
