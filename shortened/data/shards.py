"""The token shard format: self-describing, versioned, memory-mappable, checked on every read.

A shard file is (format version 2)
    bytes [0, 8)              magic b"SHRTTOK1"
    bytes [8, 12)             little-endian uint32: length of the JSON header that follows
    bytes [12, 12 + n)        JSON header: format_version, dtype, seq_len, num_tokens, num_sequences, num_docs,
                              tokenizer_sha256, tokens_offset, doc_starts_offset, crc_offset, doc_starts_crc32
    bytes [tokens_offset, ..) num_tokens token ids (dtype), num_sequences rows of seq_len, no padding
    bytes [doc_starts_offset, ..) num_docs little-endian int64: shard-local positions where a document's <s> sits
    bytes [crc_offset, ..)    num_sequences little-endian uint32: zlib.crc32 of each row's token bytes

The header region is padded to HEADER_BYTES so the token array starts page-aligned and can be memory-mapped.
Writers write to a temporary name and rename when complete: a shard that exists under its final name is whole.
A reader checks each row's CRC32 when it reads the row (~2 us per 4 KB row) and the document starts' CRC32 when
it first uses them, so a flipped bit is an error naming the file instead of a silently changed token.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from shortened.fsutil import file_sha256, fsync_dir, temp_path

MAGIC = b"SHRTTOK1"
FORMAT_VERSION = 2
HEADER_BYTES = 4096
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Data prep's record of its run (command, timings, unit size, where each shard starts, input mtimes): kept out of
# the manifest so that it stays byte-identical for any --workers and any copy of the corpus; a copy may lack it.
RUN_INFO_NAME = "prepare_run.json"


class ShardFormatError(ValueError):
    """A shard or manifest is not in the expected format; the message names the file and the fix.

    `problem` is the message without the fix, for data prep, which reports damage while it applies the fix.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while the vocabulary fits (LLaMA's 32,000 does), halving disk and page-cache use."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def rebuild_hint(directory: Path) -> str:
    """The fix for a damaged shard: data prep's rerun with --verify rebuilds exactly the damaged files. The run
    record is cited for its command only where it is."""
    run_info = directory / RUN_INFO_NAME
    command = (f"its command is in {run_info}" if run_info.is_file()
               else "with the --input, --tokenizer and settings that prepared it")
    return (f"re-run the data prep that wrote {directory} with --verify (`python data_prep/slimpajama.py ... "
            f"--output {directory} --verify`, {command}): it rebuilds damaged shards")


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
    crc_offset: int
    doc_starts_crc32: int

    @property
    def file_bytes(self) -> int:
        return self.crc_offset + 4 * self.num_sequences


class ShardWriter:
    """Streams whole sequences into one shard file; `close()` writes the header and renames it into place.

    `in_place` writes `path` itself instead of a temporary name beside it (which a restarted data prep deletes), and
    `close()` leaves it there: for a shard that grows across runs in a private directory, moved into the output by
    its owner. `sync()` makes what is written durable and returns what `synced=` takes to continue the shard from
    there after a crash: the file is cut back to that point (a killed run may have written more, or closed it) and
    its header region cleared.
    """

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, tokenizer_sha256: str, in_place: bool = False,
                 synced: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.path = Path(path)
        self.tmp_path = self.path if in_place else temp_path(self.path)
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.tokenizer_sha256 = tokenizer_sha256
        doc_starts, crcs = synced if synced is not None else (np.zeros(0, "<i8"), np.zeros(0, "<u4"))
        self.num_tokens = len(crcs) * seq_len  # only whole sequences are ever written
        self._doc_starts: list[np.ndarray] = [np.asarray(doc_starts, dtype="<i8")]
        self._crcs: list[int] = [int(crc) for crc in crcs]
        self._file = open(self.tmp_path, "wb" if synced is None else "r+b")
        self._file.truncate(HEADER_BYTES + self.num_tokens * self.dtype.itemsize)
        self._file.write(b"\0" * HEADER_BYTES)
        self._file.seek(0, os.SEEK_END)

    def write(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Append tokens (whole sequences) and the positions, relative to `tokens`, where documents start."""
        if len(tokens) % self.seq_len:
            raise ValueError(f"{len(tokens)} tokens is not a whole number of {self.seq_len}-token sequences")
        rows = np.ascontiguousarray(tokens, dtype=self.dtype).reshape(-1, self.seq_len)
        self._crcs.extend(zlib.crc32(row.tobytes()) for row in rows)
        self._file.write(rows.tobytes())
        self._doc_starts.append(np.asarray(doc_starts, dtype="<i8") + self.num_tokens)
        self.num_tokens += len(tokens)

    def sync(self) -> tuple[np.ndarray, np.ndarray]:
        """Make every sequence written so far durable; returns (document starts, CRCs) for `synced=`."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._doc_starts = [np.concatenate(self._doc_starts)]
        return self._doc_starts[0], np.asarray(self._crcs, dtype="<u4")

    def close(self) -> ShardHeader:
        doc_starts = np.concatenate(self._doc_starts)
        tokens_offset = HEADER_BYTES
        doc_starts_offset = tokens_offset + self.num_tokens * self.dtype.itemsize
        header = ShardHeader(
            format_version=FORMAT_VERSION,
            dtype=self.dtype.name,
            seq_len=self.seq_len,
            num_tokens=self.num_tokens,
            num_sequences=self.num_tokens // self.seq_len,
            num_docs=len(doc_starts),
            tokenizer_sha256=self.tokenizer_sha256,
            tokens_offset=tokens_offset,
            doc_starts_offset=doc_starts_offset,
            crc_offset=doc_starts_offset + 8 * len(doc_starts),
            doc_starts_crc32=zlib.crc32(doc_starts.tobytes()),
        )
        self._file.write(doc_starts.tobytes())
        self._file.write(np.asarray(self._crcs, dtype="<u4").tobytes())
        blob = json.dumps(asdict(header), sort_keys=True).encode()
        if len(blob) + 12 > HEADER_BYTES:
            raise ValueError("shard header does not fit")
        self._file.seek(0)
        self._file.write(MAGIC + struct.pack("<I", len(blob)) + blob)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self.tmp_path != self.path:
            os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return header

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def read_header(path: str | Path) -> ShardHeader:
    """The header of a shard of this format whose size is what the header promises; else ShardFormatError."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(HEADER_BYTES)
    except OSError as err:
        raise ShardFormatError(f"{path}: cannot read the shard ({err.strerror})", rebuild_hint(path.parent)) from None
    if len(prefix) < 12 or prefix[:8] != MAGIC:
        raise ShardFormatError(f"{path}: not a token shard (bad magic)", rebuild_hint(path.parent))
    (length,) = struct.unpack("<I", prefix[8:12])
    try:
        fields = json.loads(prefix[12 : 12 + length])
        version = fields.get("format_version")
    except (ValueError, AttributeError) as err:
        raise ShardFormatError(f"{path}: unreadable shard header ({err})", rebuild_hint(path.parent)) from None
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: shard format version {version}, this code reads {FORMAT_VERSION}",
                               version_hint(version))
    try:
        header = ShardHeader(**fields)
    except TypeError as err:
        raise ShardFormatError(f"{path}: unreadable shard header ({err})", rebuild_hint(path.parent)) from None
    size = path.stat().st_size
    if size != header.file_bytes:
        raise ShardFormatError(f"{path}: {size} bytes, header promises {header.file_bytes}: truncated",
                               rebuild_hint(path.parent))
    return header


def version_hint(version) -> str:
    # Format 1 has no per-sequence CRC: reading it would train on bytes nothing checks, so it is refused outright.
    # The cost is one re-tokenization of the corpus (see docs/shard-format.md).
    if version == 1:
        return ("format 1 has no per-sequence checksums; prepare the corpus again into a new --output with "
                "`python data_prep/slimpajama.py ... --output NEW_DIR`")
    return "prepare the corpus again with this version of data_prep/slimpajama.py"


class Shard:
    """One memory-mapped shard: `tokens` is a (num_sequences, seq_len) view, `doc_starts` shard positions.

    `sequence(row)` and `doc_starts` are checked against their CRC32s; `tokens` itself is unchecked (for tools).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        h = self.header
        self.tokens = np.memmap(self.path, dtype=h.dtype, mode="r", offset=h.tokens_offset,
                                shape=(h.num_sequences, h.seq_len))
        self.crcs = np.memmap(self.path, dtype="<u4", mode="r", offset=h.crc_offset, shape=(h.num_sequences,))

    def sequence(self, row: int) -> np.ndarray:
        tokens = self.tokens[row]
        if zlib.crc32(tokens) != int(self.crcs[row]):
            raise ShardFormatError(f"{self.path}: sequence {row} fails its CRC32 check: the file is damaged",
                                   rebuild_hint(self.path.parent))
        return tokens

    @cached_property
    def doc_starts(self) -> np.ndarray:
        h = self.header
        if not h.num_docs:
            return np.zeros(0, "<i8")
        starts = np.memmap(self.path, dtype="<i8", mode="r", offset=h.doc_starts_offset, shape=(h.num_docs,))
        if zlib.crc32(starts.tobytes()) != h.doc_starts_crc32:  # once per shard and process: ~1 ms for 100k documents
            raise ShardFormatError(f"{self.path}: the document starts fail their CRC32 check: the file is damaged",
                                   rebuild_hint(self.path.parent))
        return starts


def shard_path(directory: Path, name: str) -> Path:
    """Where a manifest entry's shard lies: in the directory, or, for a merged corpus (data_prep/merge_shards.py),
    relative to it in the part's own directory (`../part_1/shard_00000.bin`), so errors name the part."""
    return Path(os.path.normpath(directory / name))


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a shard directory; ShardFormatError if it is missing, unreadable or of another version."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(
            f"{path}: no manifest; prepare shards with `python data_prep/slimpajama.py --output {directory} ...`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ShardFormatError(f"{path}: unreadable manifest ({err}); a damaged manifest cannot be trusted: "
                               f"move {directory} aside and prepare the shards again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ShardFormatError(f"{path}: manifest version {version}, expected {MANIFEST_VERSION}")
    return manifest


def check_shards(directory: str | Path) -> dict:
    """Start-up check of a shard directory; returns its manifest, or raises ShardFormatError naming the first bad
    file and the fix.

    Cheap at any scale (one stat and one 4 KiB read per shard): every shard is present, has the manifest's size,
    and a readable header that agrees with its manifest entry. It does not hash the files (hours at SlimPajama
    scale): damage inside a shard is caught row by row as it is read, by the CRC32s.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = directory / MANIFEST_NAME
    if manifest.get("shard_format_version") != FORMAT_VERSION:
        version = manifest.get("shard_format_version")
        raise ShardFormatError(f"{path}: shards of format version {version}, this code reads {FORMAT_VERSION}",
                               version_hint(version))
    try:
        entries = [(e["file"], e["bytes"], e["num_sequences"], e["num_tokens"], e["num_docs"])
                   for e in manifest["shards"]]
        expected = (manifest["seq_len"], manifest["dtype"], manifest["tokenizer_sha256"])
        parts = [entry["path"] for entry in manifest.get("merged_from", [])]
    except (KeyError, TypeError) as err:
        raise ShardFormatError(f"{path}: incomplete manifest (missing {err}); move {directory} aside and prepare "
                               "the shards again") from None
    _check_parts_present(directory, parts)
    for name, size, num_sequences, num_tokens, num_docs in entries:
        problem = shard_problem(shard_path(directory, name), size, (num_sequences, num_tokens, num_docs), expected)
        if problem is not None:
            raise problem
    return manifest


def _check_parts_present(directory: Path, parts: list[str]) -> None:
    """A merged manifest (data_prep/merge_shards.py) finds its parts by relative path. Moved without them, its
    shards are not damaged but elsewhere, where no rerun of data prep (whose record may be gone too) finds them."""
    lost = [where for where in (shard_path(directory, part) for part in parts) if not (where / MANIFEST_NAME).is_file()]
    if lost:
        raise ShardFormatError(
            f"{directory / MANIFEST_NAME}: a merge of {', '.join(parts)} (relative to it), but {lost[0]} holds no "
            "prepared corpus: the merged manifest or its parts were moved",
            f"put {directory} back beside its parts, or merge the parts again where they are now (`python "
            f"data_prep/merge_shards.py --inputs PART ... --output {directory}`)")


def shard_problem(path: Path, size: int, counts: tuple[int, int, int], expected: tuple[int, str, str]
                  ) -> ShardFormatError | None:
    """Why the shard at `path` does not match its manifest entry (size, counts, (seq_len, dtype, tokenizer)), as
    an error naming the file and the fix; None when it matches. Costs one stat and one 4 KiB read."""
    fix = rebuild_hint(path.parent)
    if not path.is_file():
        return ShardFormatError(f"{path}: missing shard (listed in {MANIFEST_NAME})", fix)
    actual = path.stat().st_size
    if actual != size:
        return ShardFormatError(f"{path}: {actual} bytes, {MANIFEST_NAME} says {size}: truncated or replaced", fix)
    try:
        h = read_header(path)
    except ShardFormatError as err:
        return err
    if (h.num_sequences, h.num_tokens, h.num_docs) != counts or (h.seq_len, h.dtype, h.tokenizer_sha256) != expected:
        return ShardFormatError(f"{path}: header ({h.num_sequences} sequences, {h.num_tokens} tokens, {h.num_docs} "
                                f"documents, seq_len {h.seq_len}, {h.dtype}) disagrees with its {MANIFEST_NAME} entry",
                                fix)
    return None


class PackedShards:
    """All sequences of a shard directory as one indexable sequence of `seq_len`-token samples.

    The directory is checked at construction (`check_shards`) and every sample against its CRC32 when read.
    Shards are opened lazily in each process, so the object pickles cheaply into DataLoader workers
    (a pickled np.memmap would be copied as a whole array).
    """

    def __init__(self, directory: str | Path, verify: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = check_shards(self.directory)
        self.seq_len: int = self.manifest["seq_len"]
        self.tokenizer_sha256: str = self.manifest["tokenizer_sha256"]
        self._files = [shard_path(self.directory, entry["file"]) for entry in self.manifest["shards"]]
        counts = [entry["num_sequences"] for entry in self.manifest["shards"]]
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._shards: list[Shard | None] = [None] * len(self._files)
        self._pid = os.getpid()
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads everything once)."""
        for entry, path in zip(self.manifest["shards"], self._files):
            if file_sha256(path) != entry["sha256"]:  # the data prep to rerun is the one of the shard's directory
                raise ShardFormatError(f"{path}: sha256 differs from {MANIFEST_NAME}: the file is corrupt",
                                       rebuild_hint(path.parent))

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = self._locate(index)
        return shard.sequence(row).astype(np.int64)

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
        shard = self._shards[i]
        if shard is None:
            shard = self._shards[i] = Shard(self._files[i])
        start = int(self._ends[i - 1]) if i else 0
        return shard, index - start

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = [None] * len(self._files)
        return state


def open_shards(directory: str | Path, verify: bool = False) -> PackedShards:
    return PackedShards(directory, verify=verify)
