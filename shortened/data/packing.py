"""Packing: documents as `<s> ids </s>`, concatenated and cut into fixed-length sequences with no padding.

Offline preparation and the streaming loader both pack through `TokenBuffer`, so they produce the same
sequences from the same documents.
"""
from __future__ import annotations

from collections import deque

import numpy as np


def doc_starts_from_lengths(doc_lens: np.ndarray) -> np.ndarray:
    """Offsets at which each document begins in the concatenation of documents of these lengths."""
    starts = np.zeros(len(doc_lens), dtype=np.int64)
    if len(doc_lens) > 1:
        np.cumsum(doc_lens[:-1], out=starts[1:])
    return starts


def source_positions(doc_lens: np.ndarray, doc_source: np.ndarray, index: int, offset: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-source packing: where the tokens of source `index`'s documents lie, from position `offset` on, in the
    concatenation of documents of these lengths and sources, and where its documents start among those tokens."""
    mine = doc_source == index
    positions = np.flatnonzero(np.repeat(mine, doc_lens))
    positions = positions[np.searchsorted(positions, offset):]
    doc_positions = doc_starts_from_lengths(doc_lens)[mine]
    return positions, np.searchsorted(positions, doc_positions[doc_positions >= offset])


def document_position_ids(doc_starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Position of each token within its own document, restarting at 0 at every document start.

    Fed to a Hugging Face Llama as `position_ids`, these make it attend only within each document: transformers reads
    a restart as the start of a packed sequence and builds a block-causal mask (sdpa, eager); flash attention needs
    `document_bounds` of them too. Each document gets the rotary positions it would have alone. The tail of a
    document cut off by the sequence start begins at position 0, like any sequence.
    """
    positions = np.arange(seq_len, dtype=np.int64)
    segment_start = np.zeros(seq_len, dtype=np.int64)
    starts = np.asarray(doc_starts, dtype=np.int64)
    segment_start[starts] = starts
    return positions - np.maximum.accumulate(segment_start)



def document_bounds(position_ids: np.ndarray) -> np.ndarray:
    """Where each document of a micro-batch's position ids [B, S] begins in the positions flattened row after row,
    then the total (flash attention's `cu_seqlens`, int32): every restart at 0, and so every row's first token.

    Rows never share a document: each row's first token is at position 0, even a cut-off document's tail."""
    flat = np.asarray(position_ids).reshape(-1)
    return np.append(np.flatnonzero(flat == 0), flat.size).astype(np.int32)


class TokenBuffer:
    """A FIFO of tokens that remembers where documents start, popped in whole sequences."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self._chunks: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (tokens, doc starts within them)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        if len(tokens):
            self._chunks.append((np.asarray(tokens, dtype=self.dtype), np.asarray(doc_starts, dtype=np.int64)))
            self._size += len(tokens)

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """Every buffered token and the document starts among them, left buffered (to save a packer's state)."""
        tokens, doc_starts = self.pop(self._size) if self._size else (np.zeros(0, self.dtype), np.zeros(0, np.int64))
        self.append(tokens, doc_starts)
        return tokens, doc_starts

    def pop(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` tokens and the document starts among them (relative to the first popped token)."""
        if count > self._size:
            raise ValueError(f"asked for {count} tokens, {self._size} buffered")
        parts, starts, taken = [], [], 0
        while taken < count:
            tokens, doc_starts = self._chunks.popleft()
            need = count - taken
            if len(tokens) > need:
                cut = int(np.searchsorted(doc_starts, need))
                self._chunks.appendleft((tokens[need:], doc_starts[cut:] - need))
                tokens, doc_starts = tokens[:need], doc_starts[:cut]
            parts.append(tokens)
            starts.append(doc_starts + taken)
            taken += len(tokens)
        self._size -= count
        return np.concatenate(parts), np.concatenate(starts)
