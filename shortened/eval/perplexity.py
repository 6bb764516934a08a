"""Perplexity on WikiText-2 / PTB with the protocol of LLM-Pruner and Shortened LLaMA.

The rows' `field` joined by `join` ("\\n\\n") into one string, encoded by SentencePiece with one `<s>` in front of
the whole stream, cut into non-overlapping windows of `seq_len` (128) tokens; the last partial window is dropped.
Each window is scored on its own: its first token is context only, tokens 1..seq_len-1 are predicted. PPL is
exp of the mean loss over all predicted tokens: n_windows * (seq_len - 1) of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shortened.eval.mirror import read_rows
from shortened.eval.scoring import nll_sum
from shortened.eval.tasks import PerplexityTask
from shortened.tokenizer import Tokenizer


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean loss per predicted token (nats)
    tokens: int  # predicted tokens

    @classmethod
    def from_sums(cls, total: float, count: int) -> "PerplexityResult":
        if count == 0:
            raise ValueError("no complete window to score: the text is shorter than one window")
        return cls(ppl=math.exp(total / count), nll=total / count, tokens=count)


def stream_ids(tokenizer: Tokenizer, texts: list[str], join: str) -> np.ndarray:
    return np.asarray([tokenizer.bos_id] + tokenizer.encode(join.join(texts)), dtype=np.int64)


def make_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """[n, seq_len] non-overlapping windows; a last window shorter than seq_len is dropped."""
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def task_windows(spec: PerplexityTask, data_dir: str | Path, tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    path = Path(data_dir) / spec.file
    rows = read_rows(path)
    try:
        texts = [row[spec.field] for row in rows]
    except KeyError:
        raise KeyError(f"{path}: rows lack the field {spec.field!r} named in the task table") from None
    return make_windows(stream_ids(tokenizer, texts, spec.join), seq_len)


def perplexity(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 8) -> PerplexityResult:
    """Single-process perplexity of `windows` (the suite shards the same sums over ranks)."""
    return PerplexityResult.from_sums(*nll_sum(model, windows, batch_size, desc="perplexity"))
