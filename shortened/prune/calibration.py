"""Calibration token windows for block scoring: `n` windows of `length` tokens, chosen by a seed.

The published protocol (LLM-Pruner's `get_examples`, used by Shortened LLaMA) draws 10 random BookCorpus
documents of at least 128 tokens and takes a random 128-token window of each, BOS included when the window
starts at the document's head. We do the same on whatever text we are given: a `.txt` or `.raw` file
(documents separated by blank lines), a `.jsonl` / `.jsonl.zst` file (one JSON object a line, text under
`field`), or a directory of such files (sorted, read in order).

Token shards (a directory with `manifest.json`, see docs/shard-format.md) hold packed sequences, so there are no
documents to draw: `num_samples` distinct sequences are drawn and a random `length`-token window of each is taken.
Such a window may span the end of one document and the start of the next, as training sequences do. The shards'
tokenizer must be the model's (same sha256), or the ids would mean other words.
"""
from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import torch

from shortened.data.shards import MANIFEST_NAME, open_shards, read_manifest
from shortened.prune.errors import PruneInputError
from shortened.tokenizer import Tokenizer

DOCUMENT_SUFFIXES = (".txt", ".raw", ".jsonl", ".jsonl.zst")  # .raw: WikiText's plain-text release


class CalibrationError(PruneInputError):
    """The calibration input cannot give the requested windows; the message names the file and the fix."""


def calibration_windows(
    path: str | Path, tokenizer: Tokenizer, num_samples: int, length: int, seed: int, field: str = "text"
) -> torch.Tensor:
    """A `[num_samples, length]` int64 tensor of token ids; the same inputs always give the same windows."""
    if num_samples <= 0 or length <= 1:
        raise CalibrationError(f"need num_samples >= 1 and length >= 2, got {num_samples} and {length}")
    if (Path(path) / MANIFEST_NAME).is_file():
        return shard_windows(path, tokenizer.sha256, num_samples, length, seed)
    documents = read_documents(path, field)
    need = f"{num_samples} samples of {length} tokens need {num_samples} documents of at least {length} tokens"
    if not documents:
        raise CalibrationError(f"{path}: no text (empty, or only blank lines); {need}: give a calibration file "
                               "with text")
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    windows: list[list[int]] = []
    tokens = 0
    for index in order:
        ids = [tokenizer.bos_id] + tokenizer.encode(documents[index])
        tokens += len(ids)
        if len(ids) < length:
            continue
        start = rng.randint(0, len(ids) - length)
        windows.append(ids[start : start + length])
        if len(windows) == num_samples:
            return torch.tensor(windows, dtype=torch.long)
    raise CalibrationError(
        f"{path}: {tokens} tokens in {len(documents)} documents, only {len(windows)} of which have >= {length} "
        f"tokens; {need} ({num_samples * length} tokens): give more or longer text, or lower --calib-samples / "
        "--calib-len"
    )


def shard_windows(path: str | Path, tokenizer_sha256: str, num_samples: int, length: int, seed: int) -> torch.Tensor:
    """Windows from `num_samples` distinct packed sequences of a shard directory, chosen by `seed`."""
    manifest = Path(path) / MANIFEST_NAME
    data_sha256 = read_manifest(path)["tokenizer_sha256"]  # before the shard checks: the likelier mistake
    if data_sha256 != tokenizer_sha256:
        raise CalibrationError(
            f"{manifest}: shards were tokenized with tokenizer sha256 {data_sha256[:12]}..., the model's "
            f"is {tokenizer_sha256[:12]}...; prepare shards with the model's tokenizer or pass --tokenizer"
        )
    shards = open_shards(path)
    if length > shards.seq_len:
        raise CalibrationError(f"{manifest}: sequences hold {shards.seq_len} tokens, --calib-len {length} is longer")
    if num_samples > len(shards):
        raise CalibrationError(f"{manifest}: {len(shards)} sequences ({len(shards) * shards.seq_len} tokens), "
                               f"{num_samples} calibration samples need as many; lower --calib-samples")
    rng = random.Random(seed)
    windows = []
    for index in rng.sample(range(len(shards)), num_samples):
        start = rng.randint(0, shards.seq_len - length)
        windows.append(torch.from_numpy(shards[index][start : start + length]))
    return torch.stack(windows)


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """Every non-empty document of a file, or of the supported files under a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DOCUMENT_SUFFIXES))
        if not files:
            raise CalibrationError(f"{path}: directory holds no {', '.join(DOCUMENT_SUFFIXES)} files")
        return [doc for file in files for doc in _read_file(file, field)]
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file or directory")
    if not path.name.endswith(DOCUMENT_SUFFIXES):
        raise CalibrationError(f"{path}: unsupported calibration file; use one of {', '.join(DOCUMENT_SUFFIXES)}")
    return _read_file(path, field)


def _read_file(path: Path, field: str) -> list[str]:
    if path.name.endswith((".txt", ".raw")):
        return [doc for doc in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if doc.strip()]
    documents = []
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CalibrationError(f"{path}:{line_no}: no string field {field!r}; pass --calib-field")
            if text.strip():
                documents.append(text)
    return documents


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8")
    return open(path, encoding="utf-8")
