"""Validation loss on held-out token shards (e.g. SlimPajama's validation split prepared like the training data).

Every sequence of the shards is scored whole: the mean next-token loss over positions 1..seq_len-1, the quantity the
trainer minimises. The shards' tokenizer must be the model's, or the number would be meaningless.
"""
from __future__ import annotations

from pathlib import Path

import torch

from shortened.data.shards import PackedShards, open_shards, read_manifest
from shortened.eval.scoring import nll_sum
from shortened.fsutil import file_sha256

TASK = "validation"
METRIC = "loss"


def open_validation_shards(path: str | Path, tokenizer_file: str | Path) -> PackedShards:
    expected = file_sha256(tokenizer_file)
    data_sha256 = read_manifest(path)["tokenizer_sha256"]  # before the shard checks: the likelier mistake
    if data_sha256 != expected:
        raise ValueError(
            f"{Path(path) / 'manifest.json'}: shards were tokenized with tokenizer sha256 {data_sha256}, "
            f"but the model's {tokenizer_file} has {expected}; prepare the validation shards with the model's tokenizer"
        )
    shards = open_shards(path)
    if len(shards) == 0:
        raise ValueError(f"{path}: the shards hold no complete sequence")
    return shards


def validation_nll(model: torch.nn.Module, shards: PackedShards, batch_size: int, rank: int = 0,
                   world_size: int = 1, limit: int = 0) -> tuple[float, int]:
    """This rank's loss sum and predicted-token count over the first `limit` sequences (0: all)."""
    count = min(limit, len(shards)) if limit else len(shards)
    return nll_sum(model, _Prefix(shards, count), batch_size, rank, world_size, desc=TASK)


class _Prefix:
    """The first `n` sequences of the shards, as the sequence `nll_sum` indexes."""

    def __init__(self, shards: PackedShards, n: int) -> None:
        self.shards, self.n = shards, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.shards[index]
