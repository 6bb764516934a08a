"""The training loader: packed sequences from shards in the global order, this rank's slice, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from shortened.data.mixture import MixtureSampler, MixtureState, SourceIndex
from shortened.data.packing import document_position_ids
from shortened.data.sampler import GlobalOrderSampler
from shortened.data.shards import PackedShards


class SequenceDataset(Dataset):
    """Map-style: item i is packed sequence i as `input_ids` (labels are the same ids; the model shifts).

    With `document_mask`, each item also holds `position_ids` that restart at every document, so the model attends
    only within documents (see `document_position_ids`).
    """

    def __init__(self, shards: PackedShards, document_mask: bool = False) -> None:
        self.shards = shards
        self.document_mask = document_mask

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": torch.from_numpy(self.shards[index]), "sample_index": torch.tensor(index)}
        if self.document_mask:
            positions = document_position_ids(self.shards.doc_starts(index), self.shards.seq_len)
            item["position_ids"] = torch.from_numpy(positions)
        return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def build_train_loader(shards_dir: str | Path, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_world_size: int, seed: int, consumed_samples: int = 0, num_workers: int = 0,
                       pin_memory: bool = False, document_mask: bool = False,
                       worker_init_fn: Callable[[int], None] | None = None,
                       mixture: MixtureState | None = None) -> DataLoader:
    """An endless loader of micro-batches; `consumed_samples` (global, at a step boundary) is where it starts.

    With `mixture` (shards packed by source), each step's batch follows the mixture from that state instead
    (shortened/data/mixture.py); `consumed_samples` is then not needed. `worker_init_fn` runs in each worker process
    at start (the trainer uses it for signal handling).
    """
    shards = PackedShards(shards_dir)
    sampler: GlobalOrderSampler | MixtureSampler
    if mixture is None:
        sampler = GlobalOrderSampler(len(shards), global_batch_size, micro_batch_size, dp_rank, dp_world_size, seed,
                                     consumed_samples)
    else:
        index = SourceIndex.from_manifest(shards.manifest)
        if index is None:
            raise ValueError(f"{shards_dir}: a mixture needs shards prepared with --pack-by-source")
        sampler = MixtureSampler(index, mixture, global_batch_size, micro_batch_size, dp_rank, dp_world_size, seed)
    return DataLoader(
        SequenceDataset(shards, document_mask),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_fn,
    )
