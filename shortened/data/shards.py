"""The token shard format: self-describing, versioned, memory-mappable.

A shard file is
    bytes [0, 8)              magic b"SHRTTOK1"
    bytes [8, 12)             little-endian uint32: length of the JSON header that follows
    bytes [12, 12 + n)        JSON header: format_version, dtype, seq_len, num_tokens, num_sequences, num_docs,
                              tokenizer_sha256, tokens_offset, doc_starts_offset
    bytes [tokens_offset, ..) num_tokens token ids (dtype), num_sequences rows of seq_len, no padding
    bytes [doc_starts_offset, ..) num_docs little-endian int64: shard-local positions where a document's <s> sits

The header region is padded to HEADER_BYTES so the token array starts page-aligned and can be memory-mapped.
Writers write to a temporary name and rename when complete: a shard that exists under its final name is whole.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shortened.fsutil import file_sha256, fsync_dir, temp_path

MAGIC = b"SHRTTOK1"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ShardFormatError(ValueError):
    """A shard or manifest is not in the expected format; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while the vocabulary fits (LLaMA's 32,000 does), halving disk and page-cache use."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    format_version: int
    dtype: str
    seq_len: int
    num_tokens: int
    num_sequences: int
    num_docs: int
    tokenizer_sha256: str
    tokens_offset: int
    doc_starts_offset: int


class ShardWriter:
    """Streams whole sequences into one shard file; `close()` writes the header and renames it into place."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, tokenizer_sha256: str) -> None:
        self.path = Path(path)
        self.tmp_path = temp_path(self.path)
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.tokenizer_sha256 = tokenizer_sha256
        self.num_tokens = 0
        self._doc_starts: list[np.ndarray] = []
        self._file = open(self.tmp_path, "wb")
        self._file.write(b"\0" * HEADER_BYTES)

    def write(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Append tokens (whole sequences) and the positions, relative to `tokens`, where documents start."""
        if len(tokens) % self.seq_len:
            raise ValueError(f"{len(tokens)} tokens is not a whole number of {self.seq_len}-token sequences")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._doc_starts.append(np.asarray(doc_starts, dtype="<i8") + self.num_tokens)
        self.num_tokens += len(tokens)

    def close(self) -> ShardHeader:
        doc_starts = np.concatenate(self._doc_starts) if self._doc_starts else np.zeros(0, "<i8")
        tokens_offset = HEADER_BYTES
        header = ShardHeader(
            format_version=FORMAT_VERSION,
            dtype=self.dtype.name,
            seq_len=self.seq_len,
            num_tokens=self.num_tokens,
            num_sequences=self.num_tokens // self.seq_len,
            num_docs=len(doc_starts),
            tokenizer_sha256=self.tokenizer_sha256,
            tokens_offset=tokens_offset,
            doc_starts_offset=tokens_offset + self.num_tokens * self.dtype.itemsize,
        )
        self._file.write(doc_starts.tobytes())
        blob = json.dumps(asdict(header), sort_keys=True).encode()
        if len(blob) + 12 > HEADER_BYTES:
            raise ValueError("shard header does not fit")
        self._file.seek(0)
        self._file.write(MAGIC + struct.pack("<I", len(blob)) + blob)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return header

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def read_header(path: str | Path) -> ShardHeader:
    path = Path(path)
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_BYTES)
    if len(prefix) < 12 or prefix[:8] != MAGIC:
        raise ShardFormatError(f"{path}: not a token shard (bad magic); re-run data prep to rebuild it")
    (length,) = struct.unpack("<I", prefix[8:12])
    try:
        fields = json.loads(prefix[12 : 12 + length])
        header = ShardHeader(**fields)
    except (ValueError, TypeError) as err:
        raise ShardFormatError(f"{path}: unreadable shard header ({err})") from None
    if header.format_version != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: shard format version {header.format_version}, this code reads {FORMAT_VERSION}"
        )
    expected = header.doc_starts_offset + 8 * header.num_docs
    if path.stat().st_size != expected:
        raise ShardFormatError(f"{path}: {path.stat().st_size} bytes, header promises {expected}: truncated?")
    return header


class Shard:
    """One memory-mapped shard: `tokens` is a (num_sequences, seq_len) view, `doc_starts` shard positions."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        h = self.header
        self.tokens = np.memmap(self.path, dtype=h.dtype, mode="r", offset=h.tokens_offset,
                                shape=(h.num_sequences, h.seq_len))
        self.doc_starts = np.memmap(self.path, dtype="<i8", mode="r", offset=h.doc_starts_offset,
                                    shape=(h.num_docs,)) if h.num_docs else np.zeros(0, "<i8")


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(
            f"{path}: no manifest; prepare shards with `python data_prep/slimpajama.py --output {directory} ...`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ShardFormatError(f"{path}: manifest version {manifest.get('format_version')}, expected {MANIFEST_VERSION}")
    return manifest


class PackedShards:
    """All sequences of a shard directory as one indexable sequence of `seq_len`-token samples.

    Shards are opened lazily in each process, so the object pickles cheaply into DataLoader workers
    (a pickled np.memmap would be copied as a whole array).
    """

    def __init__(self, directory: str | Path, verify: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.seq_len: int = self.manifest["seq_len"]
        self.tokenizer_sha256: str = self.manifest["tokenizer_sha256"]
        self._files = [self.directory / entry["file"] for entry in self.manifest["shards"]]
        counts = [entry["num_sequences"] for entry in self.manifest["shards"]]
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._shards: list[Shard | None] = [None] * len(self._files)
        self._pid = os.getpid()
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard's checksum against the manifest (reads everything once)."""
        for entry, path in zip(self.manifest["shards"], self._files):
            if file_sha256(path) != entry["sha256"]:
                raise ShardFormatError(f"{path}: checksum differs from {MANIFEST_NAME}: the file is corrupt")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = self._locate(index)
        return shard.tokens[row].astype(np.int64)

    def doc_starts(self, index: int) -> np.ndarray:
        """Positions inside sample `index` where a document begins (its `<s>`), for cross-document masking."""
        shard, row = self._locate(index)
        lo, hi = row * self.seq_len, (row + 1) * self.seq_len
        starts = shard.doc_starts
        a, b = np.searchsorted(starts, [lo, hi])
        return np.asarray(starts[a:b]) - lo

    def _locate(self, index: int) -> tuple[Shard, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside [0, {len(self)})")
        if self._pid != os.getpid():  # forked into a worker: reopen rather than share file offsets
            self._shards = [None] * len(self._files)
            self._pid = os.getpid()
        i = int(np.searchsorted(self._ends, index, side="right"))
        if self._shards[i] is None:
            self._shards[i] = Shard(self._files[i])
        start = int(self._ends[i - 1]) if i else 0
        return self._shards[i], index - start

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = [None] * len(self._files)
        return state


def open_shards(directory: str | Path, verify: bool = False) -> PackedShards:
    return PackedShards(directory, verify=verify)
