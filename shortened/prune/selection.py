"""Which blocks go: one-shot (score once, drop the lowest) or iterative (drop one, re-score, repeat; SLEB-style).

Block indices here are always those of the original model. The "+" heuristic of Shortened LLaMA protects the
first and last blocks: they are never candidates, whatever their score.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from shortened.prune.blocks import decoder_layers, skip_blocks
from shortened.prune.budget import candidate_blocks, check_removable
from shortened.prune.importance import CRITERIA, GRADIENT_CRITERIA, SCORERS


@dataclass
class Selection:
    removed: list[int]  # original indices, in the order they were chosen
    scores: Sequence[float | None]  # one-shot: per original block (angular: per run start); iterative: the first round
    rounds: list[dict] = field(default_factory=list)  # iterative: {"scores": {block: score}, "removed": block}


def select_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    criterion: str,
    count: int,
    *,
    protect_first: int,
    protect_last: int,
    iterative: bool,
    batch_size: int,
    dtype: torch.dtype,
) -> Selection:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    num_blocks = len(decoder_layers(model))
    check_removable(count, num_blocks, protect_first, protect_last, f"{count} blocks to remove")
    candidates = candidate_blocks(num_blocks, protect_first, protect_last)
    if iterative:
        if criterion in GRADIENT_CRITERIA:
            raise ValueError(f"--iterative re-scores after every removal; use it with a criterion that needs no "
                             f"gradients ({', '.join(c for c in CRITERIA if c not in GRADIENT_CRITERIA)})")
        return _iterative(model, windows, criterion, count, candidates, batch_size, dtype)
    if criterion == "angular":
        return _angular_run(model, windows, count, candidates, batch_size, dtype)
    scores = SCORERS[criterion](model, windows, batch_size, dtype)
    return Selection(removed=_lowest(dict(enumerate(scores)), candidates, count), scores=scores)


def _lowest(scores: dict[int, float], candidates: list[int], count: int) -> list[int]:
    """The `count` candidates with the lowest scores; ties go to the lower block index, so the choice is stable."""
    return sorted(candidates, key=lambda block: (scores[block], block))[:count]


def _angular_run(
    model: nn.Module, windows: torch.Tensor, count: int, candidates: list[int], batch_size: int, dtype: torch.dtype
) -> Selection:
    num_blocks = len(decoder_layers(model))
    distances = SCORERS["angular"](model, windows, batch_size, dtype, run_length=count)
    allowed = set(candidates)
    starts = [s for s in range(len(distances)) if all(b in allowed for b in range(s, s + count))]
    best = min(starts, key=lambda s: (distances[s], s))
    scores: list[float | None] = distances + [None] * (num_blocks - len(distances))
    return Selection(removed=list(range(best, best + count)), scores=scores)


def _iterative(
    model: nn.Module,
    windows: torch.Tensor,
    criterion: str,
    count: int,
    candidates: list[int],
    batch_size: int,
    dtype: torch.dtype,
) -> Selection:
    num_blocks = len(decoder_layers(model))
    removed: list[int] = []
    rounds: list[dict[str, Any]] = []
    for _ in range(count):
        kept = [b for b in range(num_blocks) if b not in removed]
        with skip_blocks(model, removed):
            # angular with runs of one block: the distance across each single remaining block.
            current = SCORERS[criterion](model, windows, batch_size, dtype)
        scores = dict(zip(kept, current))
        choice = _lowest(scores, [b for b in candidates if b not in removed], 1)[0]
        removed.append(choice)
        rounds.append({"scores": scores, "removed": choice})
    first = rounds[0]["scores"]
    return Selection(removed=removed, scores=[first[b] for b in range(num_blocks)], rounds=rounds)
