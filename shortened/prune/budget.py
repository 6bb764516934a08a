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

RATIO_TOLERANCE = 0.005


def blocks_for_ratio(ratio: float, total_params: int, block_params: int) -> int:
    """The number of blocks whose removal takes away `ratio` of `total_params` (see the module docstring)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must lie strictly between 0 and 1 (a fraction of parameters), got {ratio}")
    # The small epsilon keeps an exact boundary (k * P_block == limit) from being lost to float rounding.
    return int((ratio + RATIO_TOLERANCE) * total_params / block_params + 1e-9)


def blocks_to_remove(
    num_blocks: int,
    total_params: int,
    block_params: int,
    *,
    remove: int = 0,
    ratio: float = 0.0,
    keep: int = 0,
) -> int:
    """Resolve exactly one of `remove`, `ratio`, `keep` (the others 0) to a block count in 1..num_blocks-1."""
    given = [name for name, value in (("--remove", remove), ("--ratio", ratio), ("--keep-blocks", keep)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --remove, --ratio, --keep-blocks (got {', '.join(given) or 'none'})")
    if remove:
        count = remove
    elif keep:
        count = num_blocks - keep
    else:
        count = blocks_for_ratio(ratio, total_params, block_params)
    if not 1 <= count < num_blocks:
        raise ValueError(
            f"{given[0]} asks to remove {count} of {num_blocks} blocks; at least one must go and one must stay"
        )
    return count
