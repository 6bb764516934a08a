"""Summed next-token loss of token windows: the one scoring routine behind perplexity and validation loss."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


class Windows(Protocol):
    """What `nll_sum` reads: a 2-D token array, or a lazy sequence of 1-D arrays (validation shards)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token | window prefix) over tokens 1.. of each window (token 0 is context only), and count."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits
        # Targets shifted in place of the logits (the last position ignored): slicing [B, T, 32k] logits instead
        # would copy them. float32 log-softmax: bf16 would round the loss of a 32k-way softmax.
        targets = torch.full_like(windows, -100)
        targets[:, :-1] = windows[:, 1:]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), reduction="sum")
    return float(loss.double()), windows.numel() - windows.size(0)


def nll_sum(model: torch.nn.Module, windows: Windows, batch_size: int, rank: int = 0,
            world_size: int = 1, desc: str = "score") -> tuple[float, int]:
    """Loss sum and predicted-token count of this rank's share (every world_size-th window, from `rank`)."""
    device = next(model.parameters()).device
    mine = list(range(rank, len(windows), world_size))
    total, count = 0.0, 0
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, unit="batch", disable=rank != 0):
        batch = np.stack([np.asarray(windows[i]) for i in mine[start:start + batch_size]])
        nll, n = window_nll(model, torch.as_tensor(batch, dtype=torch.long, device=device))
        total += nll
        count += n
    return total, count
