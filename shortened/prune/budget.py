"""How many blocks to remove: a count, a number to keep, or a fraction of the model's parameters.

A ratio R is a fraction of ALL parameters (embeddings and LM head included, as the paper's 5.5B/3.7B/... sizes
are). Removing k blocks removes k * P_block of P_total parameters; we remove the largest k with

    k * P_block <= (R + 0.005) * P_total

i.e. the removed fraction, rounded to the nearest whole percent, does not exceed R. The half-point tolerance is
there because published ratios are whole percents of an integer number of blocks: for Vicuna-7B
(P_block = 202,383,360, P_total = 6,738,415,616) 15 blocks remove 45.05% and 20 blocks 60.07%, which the paper
calls 45% and 60%, while 7 blocks (21.02%) are not "20%" and 27 blocks (81.09%) are not "80%". This gives the
published 26 / 17 / 12 / 6 blocks kept at 20 / 45 / 60 / 80 %; a strict `<= R` would keep 18 and 13 instead.
"""
from __future__ import annotations

from shortened.prune.errors import PruneInputError

RATIO_TOLERANCE = 0.005


def blocks_for_ratio(ratio: float, total_params: int, block_params: int) -> int:
    """The number of blocks whose removal takes away `ratio` of `total_params` (see the module docstring)."""
    if not 0.0 < ratio < 1.0:
        raise PruneInputError(f"--ratio must lie strictly between 0 and 1 (a fraction of parameters), got {ratio}")
    # The small epsilon keeps an exact boundary (k * P_block == limit) from being lost to float rounding.
    return int((ratio + RATIO_TOLERANCE) * total_params / block_params + 1e-9)


def blocks_to_remove(
    num_blocks: int,
    total_params: int,
    block_params: int,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    keep: int | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
) -> int:
    """Resolve the one of `remove`, `ratio`, `keep` that is given (PruneConfig checks there is exactly one) to a
    block count in 1..num_blocks-1 that leaves the protected blocks in place."""
    if remove is not None:
        count, asked = remove, f"--remove {remove}"
    elif keep is not None:
        count, asked = num_blocks - keep, f"--keep-blocks {keep}"
    elif ratio is not None:
        count, asked = blocks_for_ratio(ratio, total_params, block_params), f"--ratio {ratio}"
    else:
        raise ValueError("one of remove, ratio, keep must be given")
    if remove is None:
        asked += f" removes {count} blocks"
    if not 1 <= count < num_blocks:
        raise PruneInputError(f"{asked}, but the model has {num_blocks} blocks: at least one must go and one must "
                              "stay")
    check_removable(count, num_blocks, protect_first, protect_last, asked)
    return count


def candidate_blocks(num_blocks: int, protect_first: int, protect_last: int) -> list[int]:
    """The blocks the "+" heuristic lets go: all but the first `protect_first` and the last `protect_last`."""
    if protect_first < 0 or protect_last < 0:
        raise PruneInputError("--protect-first and --protect-last must be >= 0")
    return list(range(protect_first, num_blocks - protect_last))


def check_removable(count: int, num_blocks: int, protect_first: int, protect_last: int, asked: str) -> None:
    """Refuse a count that would take protected blocks; the message names the count and the protected blocks."""
    candidates = candidate_blocks(num_blocks, protect_first, protect_last)
    if count > len(candidates):
        raise PruneInputError(
            f"{asked}, but only {len(candidates)} of the model's {num_blocks} blocks may be removed: "
            f"{_protected(num_blocks, protect_first, protect_last)}; lower the count, or the protection "
            f"(--protect-first {protect_first}, --protect-last {protect_last}, --no-protect)"
        )


def _protected(num_blocks: int, protect_first: int, protect_last: int) -> str:
    first = min(protect_first, num_blocks)
    last = max(first, num_blocks - protect_last)
    spans = [f"{_span(0, first)} by --protect-first {protect_first}" if first else "",
             f"{_span(last, num_blocks)} by --protect-last {protect_last}" if last < num_blocks else ""]
    return " and ".join(s for s in spans if s) + " are protected" if any(spans) else "none is protected"


def _span(start: int, stop: int) -> str:
    return f"block {start}" if stop - start == 1 else f"blocks {start}-{stop - 1}"
