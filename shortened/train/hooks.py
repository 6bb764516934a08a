"""The seam for work that runs inside the training loop without being part of it (inline evaluation).

A hook is a `TrainerHook` (or any object with some of its methods):

    before_training(ctx: StepContext)   once, after the engine is built (and resumed), before the first step:
                                        the place for collective set-up and for failing fast on bad settings
    after_step(ctx: StepContext)        every optimizer step, once the step's line is logged
    after_checkpoint(ctx: StepContext)  after a checkpoint is complete (its complete.json exists), ctx.checkpoint set
    missed_at_resume(step, tokens, step_tokens, run_dir, rank) -> bool
                                        whether the hook's work at the step a run resumes from was lost (its job
                                        stopped during an evaluation): before_training then does it. Asked before
                                        the engine is built, so a run with nothing left to train still builds it
                                        when a hook says yes

They are called on every rank at the same point, so a hook may use collectives (shard work over ranks).
`ctx.model` is the Hugging Face model the engine trains, whole on every rank under ZeRO-1/2. The loop runs
each hook with every RNG state saved and restored and hands every module back in the train/eval mode it had, so
a hook cannot change the training trajectory: a run with hooks has the same loss trace as one without. This is
the one place that guard lives; the evaluation suite only switches the model to eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from shortened.rng import preserved_rng_and_mode


@dataclass(frozen=True)
class StepContext:
    step: int  # optimizer steps done
    tokens: int  # tokens consumed so far (all ranks)
    step_tokens: int  # tokens per optimizer step
    consumed_samples: int
    loss: float  # this step's mean loss over all ranks (nan in before_training)
    model: torch.nn.Module
    run_dir: Path
    rank: int
    world_size: int
    tokenizer_file: Path | None  # the model's tokenizer (tokenizer.model), None if its directory has none
    checkpoint: Path | None = None


HookPoint = Literal["before_training", "after_step", "after_checkpoint"]


class TrainerHook:
    """Base of the trainer's hooks: override the methods you need, the others do nothing.

    Subclassing is for the type checker; at run time any object with some of these methods is a hook (call_hooks
    looks them up by name), as the hooks users pass to `cpt_main` have always been.
    """

    def before_training(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def after_checkpoint(self, ctx: StepContext) -> None:
        pass

    def missed_at_resume(self, step: int, tokens: int, step_tokens: int, run_dir: Path, rank: int) -> bool:
        return False


def missed_at_resume(hooks: Sequence[TrainerHook], step: int, tokens: int, step_tokens: int, run_dir: Path,
                      rank: int) -> bool:
    """Whether any hook lost work at the step a run resumes from (collective: every hook is asked)."""
    answers = [fn(step, tokens, step_tokens, run_dir, rank) for hook in hooks
               if (fn := getattr(hook, "missed_at_resume", None)) is not None]
    return any(answers)


def call_hooks(hooks: Sequence[TrainerHook], method: HookPoint, ctx: StepContext) -> None:
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is None:
            continue
        with preserved_rng_and_mode(ctx.model):
            fn(ctx)
