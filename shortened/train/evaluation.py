"""Evaluation during training, from the run config's `eval:` section.

`eval.mode: inline` evaluates the model in memory on every rank (work sharded over the data-parallel ranks) at the
`eval.every_tokens` / `eval.every_steps` points, plus once before the first step of a new run so every curve
starts at the pruned model. `eval.mode: watch` leaves evaluation to `launch/eval_watch.py`, which reads this run's
complete checkpoints from another process, GPU or node and costs the training job nothing.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shortened.config import ConfigError, RunConfig
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
            raise ConfigError("eval.mode=inline: the model in model.init_from has no tokenizer.model to score with")
        # Collective, and a bad task name raises here: before any compute is spent on training.
        self.evaluator = InlineEvaluator(self.config.eval, ctx.run_dir, ctx.tokenizer_file,
                                         validation_path=self.config.data.validation_path)
        if ctx.step == 0:
            self.evaluator(ctx.model, ctx.step, ctx.tokens)

    def after_step(self, ctx: StepContext) -> None:
        if self.evaluator is not None and self.evaluator.due(ctx.step, ctx.tokens, ctx.step_tokens):
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
