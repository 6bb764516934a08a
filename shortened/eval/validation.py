"""Validation loss on held-out token shards (e.g. SlimPajama's validation split prepared like the training data).

Every sequence of the shards is scored whole: the mean next-token loss over positions 1..seq_len-1, the quantity the
trainer minimises. The shards' tokenizer must be the model's, or the number would be meaningless.

A limit of n sequences scores n spread evenly over the split (or over one source's sequences), not its first n: the
shards keep documents in order, and one long document fills many consecutive sequences (in the shared sample's
validation split the first 200 sequences hold about 25 documents, 200 spread ones about 67), so a prefix measures a few
documents' text, and which model leads can depend on which.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from shortened.data.mixture import SourceIndex
from shortened.data.shards import PackedShards, open_shards, read_manifest
from shortened.eval.results import ok_row
from shortened.eval.scoring import nll_sum, window_nll
from shortened.fsutil import file_sha256
from shortened.tokenizer import DOCUMENT_TOKENS_FILE, load_tokenizer

TASK = "validation"
METRIC = "loss"
# Which sequences a limit scores, recorded beside every validation loss (results rows, dynamic loading's reference
# file): a loss measured before they were spread (on the split's first n) has no mark, and is recognised as such
# instead of being compared with a spread one as if the model had moved.
SEQUENCES = "spread"


def loss_row(task: str, loss: float, *, samples: int, seconds: float = 0.0) -> dict:
    """A results row of a validation loss (`task`: validation, or validation/SOURCE), marked with the sequences it
    was measured on."""
    return {**ok_row(task, METRIC, loss, primary=True, samples=samples, seconds=seconds), "sequences": SEQUENCES}


def open_validation_shards(path: str | Path, tokenizer_file: str | Path) -> PackedShards:
    """The shards, once their tokenizer and document separators are the model's (the trainer checks its data.path
    the same way)."""
    expected = file_sha256(tokenizer_file)
    manifest = read_manifest(path)
    data_sha256 = manifest["tokenizer_sha256"]  # before the shard checks: the likelier mistake
    if data_sha256 != expected:
        raise ValueError(
            f"{Path(path) / 'manifest.json'}: shards were tokenized with tokenizer sha256 {data_sha256}, "
            f"but the model's {tokenizer_file} has {expected}; prepare the validation shards with the model's tokenizer"
        )
    _check_document_ids(Path(path), manifest, Path(tokenizer_file))
    shards = open_shards(path)
    if len(shards) == 0:
        raise ValueError(f"{path}: the shards hold no complete sequence")
    return shards


def _check_document_ids(path: Path, manifest: dict, tokenizer_file: Path) -> None:
    """One tokenizer file can frame documents with other ids (`document_tokens.json`: SmolLM2's <|endoftext|> or the
    instruct EOS <|im_end|>); the loss over such shards scores separators the model is not trained to predict.
    Manifests older than the ids' record are not checked."""
    framed = manifest.get("bos_id"), manifest.get("eos_id")
    tokenizer = load_tokenizer(tokenizer_file)
    if None in framed or framed == (tokenizer.bos_id, tokenizer.eos_id):
        return
    raise ValueError(
        f"{path / 'manifest.json'}: the validation shards frame documents with bos/eos ids {framed[0]}/{framed[1]}, "
        f"but the model ({tokenizer_file.parent}) frames them with {tokenizer.bos_id}/{tokenizer.eos_id} (its "
        f"tokenizer_config.json or {DOCUMENT_TOKENS_FILE}); prepare the validation shards with the model's tokenizer "
        "directory"
    )


def spread(count: int, limit: int) -> np.ndarray:
    """`limit` of the indices 0..count-1 spread evenly over them, in order (all of them when `limit` is 0 or at
    least `count`)."""
    if not limit or limit >= count:
        return np.arange(count, dtype=np.int64)
    return np.arange(limit, dtype=np.int64) * count // limit


def validation_nll(model: torch.nn.Module, shards: PackedShards, batch_size: int, rank: int = 0,
                   world_size: int = 1, limit: int = 0) -> tuple[float, int]:
    """This rank's loss sum and predicted-token count over `limit` sequences spread over the split (0: all)."""
    return nll_sum(model, _Subset(shards, spread(len(shards), limit)), batch_size, rank, world_size, desc=TASK)


class _Subset:
    """Some sequences of the shards, as the sequence `nll_sum` indexes."""

    def __init__(self, shards: PackedShards, ids: np.ndarray) -> None:
        self.shards, self.ids = shards, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.shards[int(self.ids[index])]


def domain_validation_losses(model: torch.nn.Module, shards: PackedShards, index: SourceIndex,
                             sources: Sequence[str], batch_size: int, limit: int = 0, rank: int = 0,
                             world_size: int = 1, reduce: Callable[[list[float]], list[float]] | None = None
                             ) -> dict[str, float]:
    """Each source's mean next-token loss over `limit` of its validation sequences spread over them (0: all), on
    every rank.

    The same bits on any world size, because dynamic loading turns them into weights that pick samples: each source's
    sequences are cut into batches of `batch_size` (a batch's composition never depends on the ranks), batch b of the
    whole list is scored by rank b mod world_size, `reduce` (a float64 all-reduce sum over ranks) adds the one rank's
    sum to zeros from the others, and the per-batch sums are added in batch order.
    """
    batches = []  # (source, global ids) in source order
    for source in sources:
        size = index.size(source)
        ids = index.to_global(source, spread(size, limit))
        batches += [(source, ids[lo : lo + batch_size]) for lo in range(0, len(ids), batch_size)]
    device = next(model.parameters()).device
    sums = [0.0] * len(batches)
    for b in range(rank, len(batches), world_size):
        windows = np.stack([shards[int(i)] for i in batches[b][1]])
        sums[b], _ = window_nll(model, torch.as_tensor(windows, dtype=torch.long, device=device))
    if reduce is not None:
        sums = reduce(sums)
    totals = {source: 0.0 for source in sources}
    counts = {source: 0 for source in sources}
    for (source, ids), total in zip(batches, sums):
        totals[source] += total
        counts[source] += len(ids) * (shards.seq_len - 1)
    return {source: totals[source] / counts[source] for source in sources}
