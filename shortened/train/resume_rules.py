"""Which settings may change when a run resumes, and how each change is honoured; every other change is refused.

A resumed run used to keep some of the checkpoint's values silently (DeepSpeed restores the clipping threshold,
the optimizer's `load_state_dict` restores betas, eps, weight decay and the last learning rate) while the new
checkpoint recorded the config's values. Now every key of `RunConfig` has a rule here, and a test walks the table
in docs/training.md against it: a key is either honoured from the first resumed step (the trainer re-applies it
after loading the checkpoint) or refused before training with both values named.

The rules are matched by the longest dotted prefix, so `eval` covers every `eval.*` key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shortened.config import MISSING, RunConfig, config_keys, dotted_value


@dataclass(frozen=True)
class ResumeRule:
    action: Literal["honoured", "refused", "ignored"]
    how: str  # honoured: how the new value takes effect; refused: why it cannot change


def honoured(how: str) -> ResumeRule:
    return ResumeRule("honoured", how)


def refused(why: str) -> ResumeRule:
    return ResumeRule("refused", why)


RULES: dict[str, ResumeRule] = {
    "run_dir": ResumeRule("ignored", "where the run lives; a checkpoint may be resumed into another run_dir"),
    "resume": ResumeRule("ignored", "chooses the checkpoint"),
    "deepspeed_config": honoured("engine tuning (buckets, overlap) is read at start; the ZeRO stage may not change"),
    "model.init_from": honoured("gives the architecture (checked) and the tokenizer; weights come from the checkpoint"),
    "model.activation_checkpointing": honoured("applied when the model is built"),
    "model.attn_implementation": honoured("applied when the model is built"),
    "model.liger": honoured("applied when the model is built; the same weights and parameter names"),
    "data.path": honoured("the next samples are read from it at the consumed position; other shards are warned about"),
    "data.format": refused("the consumed-sample position means something else in the other format"),
    "data.split": refused("the consumed-sample position counts documents of that split"),
    "data.validation_path": honoured("read at each evaluation"),
    "data.seq_len": refused("the checkpoint's position and token counts are in its sequence length"),
    "data.seed": refused("the seed defines the sample order; another would repeat and skip samples"),
    "data.num_workers": honoured("loader processes only; the samples do not depend on it"),
    "data.document_mask": honoured("applies to every batch after the checkpoint"),
    "data.dynamic": honoured("the weights go on from the checkpoint's, which hold every update so far (unless "
                             "data.mixture changed); the settings apply from the next update (a new reference model is "
                             "measured afresh)"),
    "data.mixture": honoured("new weights from the resumed step: each source goes on in its own order from its saved "
                             "count, the rounding starts afresh; under data.dynamic they replace the updated weights "
                             "and the updates go on from them; turning a mixture on or off is refused (a per-source "
                             "order does not continue the global one)"),
    "train.global_batch_size": honoured("from the next step, if it divides the consumed samples; the token budget "
                                        "counts the tokens already trained"),
    "train.micro_batch_size": honoured("gradient accumulation is derived again; the global batch is unchanged"),
    "train.max_tokens": honoured("the stop and the schedule's horizon are computed from the tokens already trained"),
    "train.max_steps": honoured("the stop"),
    "train.seed": refused("the model-side RNG continues from the checkpoint's saved state"),
    "train.precision": refused("the checkpoint's optimizer state is laid out for its precision"),
    "train.grad_clip": honoured("set on the optimizer after loading (DeepSpeed would restore the saved one)"),
    "train.nan_policy": honoured("read at every step"),
    "train.max_consecutive_skips": honoured("read at every step"),
    "train.dist_timeout_s": honoured("applied when the process group is created"),
    "train.loss_chunk_size": honoured("read at every step; the loss differs only in the order of its sums"),
    "train.compile": honoured("applied when the model is built; the same weights and parameter names"),
    "train.tf32": honoured("applied when the model is built (CUDA only); the products' rounding changes"),
    "optim.lr": honoured("the first resumed update uses the new peak times the schedule's factor"),
    "optim.betas": honoured("set on every optimizer parameter group after loading"),
    "optim.eps": honoured("set on every optimizer parameter group after loading"),
    "optim.weight_decay": honoured("set on the decayed parameter group after loading (norms and biases stay at 0)"),
    "optim.schedule": honoured("the schedule is a function of the step and the current config"),
    "optim.warmup_steps": honoured("the schedule is a function of the step and the current config"),
    "optim.min_lr_ratio": honoured("the schedule is a function of the step and the current config"),
    "checkpoint": honoured("read at every save"),
    "eval": honoured("read at every evaluation"),
    "log": honoured("read at every step"),
    "distill": honoured("the teacher is loaded at start and holds no state in the checkpoint: the loss changes from "
                        "the first resumed step"),
}


def rule_for(key: str) -> ResumeRule:
    """The rule of a dotted config key (longest matching prefix); a key without one is a bug, caught by a test."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    raise KeyError(f"{key}: no resume rule; add it to shortened/train/resume_rules.py and docs/training.md")


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The run config's settings (its leaf keys: a mapping such as data.mixture is one setting's value) whose values
    differ between two nested config dicts, with (old, new). A key the old config lacks (it predates the key) is not
    a change; one it holds as null is (data.mixture unset, then set)."""
    changes = {}
    for key in (doc.key for doc in config_keys(RunConfig)):
        old_value, new_value = dotted_value(old, key), dotted_value(new, key)
        if old_value is not MISSING and not _same(old_value, new_value):
            changes[key] = (old_value, None if new_value is MISSING else new_value)
    return changes


def _same(old: Any, new: Any) -> bool:
    """YAML writes tuples as lists; (0.9, 0.95) and [0.9, 0.95] are one value."""
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new
