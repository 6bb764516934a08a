"""Streaming mode: packed sequences straight from raw `.jsonl.zst` (or a streamed HF dataset), no shards on disk.

The documents are read, tokenized and packed by the same code as offline preparation, so sequence p of the
stream is byte-for-byte row p of the shards that `data_prep/slimpajama.py` writes from the same inputs.
There is no global shuffle (a stream has no random access): the global order is the input order, and ranks take
their slice of each global batch exactly as with shards. Each DataLoader worker packs the whole stream and keeps
every num_workers-th micro-batch, which keeps tokenization off the training process at the price of tokenizing
once per worker; a resumed job re-reads the stream up to `consumed_samples`. For week-long runs prepare shards
offline; streaming is for quick experiments on corpora that are not prepared yet.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shortened.data.packing import TokenBuffer, doc_starts_from_lengths, document_position_ids
from shortened.data.prep_stats import describe_bad
from shortened.data.shards import token_dtype
from shortened.data.sources import discover, plan_units
from shortened.data.tokenize_worker import tokenize_documents
from shortened.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    input: str  # a local tree/file, or hf://DATASET_ID
    tokenizer: str
    seq_len: int
    split: str | None = None
    sources: tuple[str, ...] | None = None
    hf_data_files: tuple[str, ...] | None = None



def stream_sequences(spec: StreamSpec) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every full packed sequence of the inputs, in order (one pass), with the document starts inside it."""
    tokenizer = load_tokenizer(spec.tokenizer)
    files = discover(spec.input, spec.split, spec.hf_data_files)
    sources = frozenset(spec.sources) if spec.sources else None
    buffer = TokenBuffer(token_dtype(tokenizer.vocab_size))
    for f in files:
        unit = plan_units([f], unit_bytes=1 << 62)[0]  # one unit: the whole file, read as a stream
        result = tokenize_documents(tokenizer, f, unit, sources)
        for bad in result.bad:
            logger.warning("skipped bad input %s", describe_bad(f.name, bad))
        buffer.append(result.tokens, doc_starts_from_lengths(result.doc_lens))
        while len(buffer) >= spec.seq_len:
            yield buffer.pop(spec.seq_len)


class StreamingMicroBatches(IterableDataset):
    """This rank's micro-batches of the stream from global position `consumed_samples`, pass after pass."""

    def __init__(self, spec: StreamSpec, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_world_size: int, consumed_samples: int = 0, document_mask: bool = False) -> None:
        per_rank, rest = divmod(global_batch_size, dp_world_size)
        if rest or per_rank % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} does not split into {dp_world_size} ranks x "
                             f"micro batches of {micro_batch_size}")
        self.spec = spec
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.first = dp_rank * per_rank  # this rank's slice of each global batch: [first, first + per_rank)
        self.per_rank = per_rank
        self.consumed_samples = consumed_samples
        self.document_mask = document_mask

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        micro_index, rows, starts, positions = 0, [], [], []
        for position, (tokens, doc_starts) in self._positions():
            if position < self.consumed_samples:
                continue
            if not self.first <= position % self.global_batch_size < self.first + self.per_rank:
                continue
            rows.append(tokens)
            starts.append(doc_starts)
            positions.append(position)
            if len(rows) == self.micro_batch_size:
                if micro_index % workers == worker:  # DataLoader collects workers round-robin: order is kept
                    yield self._micro_batch(rows, starts, positions)
                micro_index += 1
                rows, starts, positions = [], [], []

    def _micro_batch(self, rows: list[np.ndarray], starts: list[np.ndarray],
                     positions: list[int]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": torch.from_numpy(np.stack(rows).astype(np.int64)),
                 "sample_index": torch.tensor(positions)}
        if self.document_mask:
            batch["position_ids"] = torch.from_numpy(
                np.stack([document_position_ids(s, self.spec.seq_len) for s in starts]))
        return batch

    def _positions(self) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        position = 0
        while True:
            produced = False
            for sequence in stream_sequences(self.spec):
                produced = True
                yield position, sequence
                position += 1
            if not produced:
                raise ValueError(f"{self.spec.input}: yields no full sequence of {self.spec.seq_len} tokens")


def build_streaming_loader(spec: StreamSpec, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                           dp_world_size: int, consumed_samples: int = 0, num_workers: int = 0,
                           pin_memory: bool = False, document_mask: bool = False,
                           worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """The streaming counterpart of `build_train_loader`: same batches layout, same resume by `consumed_samples`."""
    dataset = StreamingMicroBatches(spec, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                    dp_rank=dp_rank, dp_world_size=dp_world_size, consumed_samples=consumed_samples,
                                    document_mask=document_mask)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=pin_memory, worker_init_fn=worker_init_fn)
