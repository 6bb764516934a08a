"""Reading raw documents: SlimPajama trees of `.jsonl.zst`, plain `.jsonl`, with every kind of bad input counted.

Work is cut into units: the lines of one input file whose first byte lies in a range of its decompressed
bytes. Units let two workers share one large file, and since a unit is a pure function of (file, range), the
documents it yields never depend on how many workers there are. Memory stays flat: files are decompressed as a
stream and only one line (one document, possibly several MB) is held at a time.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

LFS_POINTER_PREFIX = b"version https://git-lfs"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_BYTES = 1 << 20

# Reasons a line or file is rejected; each is counted per file in the manifest.
CORRUPT_ZST = "corrupt_zst"
LFS_POINTER = "lfs_pointer"
EMPTY_FILE = "empty_file"
BLANK_LINE = "blank_line"
MALFORMED_JSON = "malformed_json"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
EMPTY_TEXT = "empty_text"
INVALID_UTF8 = "invalid_utf8"
DATASET_ERROR = "dataset_error"  # the `datasets` reader failed inside a shard; the rest of that shard is lost
UNKNOWN_SOURCE = "unknown"
KNOWN_SPLITS = ("train", "validation", "test")
HF_PREFIX = "hf://"  # an input of hf://cerebras/SlimPajama-627B streams a Hugging Face dataset


class InputError(ValueError):
    """Input that cannot be read at all (missing path, nothing to read); the message names the path."""


class CorruptStream(Exception):
    """The compressed stream is damaged or truncated at this point."""


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face dataset read with `datasets` streaming: a hub id, or a builder such as "json" with files."""

    path: str
    split: str = "train"
    name: str | None = None
    data_files: tuple[str, ...] | None = None

    def load(self):
        from datasets import load_dataset

        files = list(self.data_files) if self.data_files else None
        return load_dataset(self.path, self.name, split=self.split, data_files=files, streaming=True)


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute path (for a dataset shard: a readable label)
    name: str  # path relative to the input root, used in reports and the manifest
    size_hint: int  # decompressed bytes if the zstd header says so, else the file size: for planning only
    dataset: HFDataset | None = None  # set for one shard of a streamed Hugging Face dataset
    shard: int = 0
    num_shards: int = 1


@dataclass(frozen=True)
class WorkUnit:
    index: int
    file_index: int
    start: int  # the unit owns the lines whose first byte lies in [start, end) of the decompressed stream
    end: int | None  # None: to the end of the file (the last unit, whatever the header said)


@dataclass
class Document:
    text: str
    source: str


@dataclass
class BadLine:
    line: int  # 1-based line number in the decompressed file (0 for a whole-file problem)
    reason: str
    docs_before: int  # documents of this unit yielded before it, so a --max-tokens cut can order them


@dataclass
class UnitReadLog:
    """What a unit saw besides good documents."""

    bad: list[BadLine] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)  # documents skipped by --sources, per source


def discover(input: str, split: str | None = None, hf_data_files: list[str] | tuple[str, ...] | None = None
             ) -> list[InputFile]:
    """The inputs named by a command line's --input: a local tree or file, or hf://DATASET (+ data files)."""
    if not input.startswith(HF_PREFIX):
        return discover_inputs(input, split)
    files = tuple(hf_data_files) if hf_data_files else None
    return discover_dataset_shards(HFDataset(input[len(HF_PREFIX):], split or "train", None, files))


def partition_files(files: list[InputFile], num_partitions: int, partition: int) -> list[InputFile]:
    """Part `partition` of `num_partitions`: every num_partitions-th file of the sorted list, from `partition` on.

    It depends only on the list, so every node computes the same parts; they are disjoint and together hold every
    file. Round-robin rather than by size: a streamed dataset's shards have no sizes, and SlimPajama's chunk files
    are of one size.
    """
    if num_partitions == 1:
        return files
    part = files[partition::num_partitions]
    if not part:
        raise InputError(f"--partition {partition} of --num-partitions {num_partitions}: the input has only "
                         f"{len(files)} file(s), so this part would be empty; use at most {len(files)} partitions")
    return part


def discover_inputs(root: str | Path, split: str | None = None) -> list[InputFile]:
    """Every `*.jsonl.zst`, `*.zst` and `*.jsonl` file under `root` (or `root/split`), in sorted path order."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: input does not exist")
    # --split validation on a folder or file outside any split folder would pack whatever it holds (train data,
    # say) as validation data. A path inside a folder named like the split is that split.
    in_split = not split or split in root.resolve().parts
    if root.is_file():
        if not in_split:
            raise InputError(f"{root}: lies in no '{split}' folder, so it is not {split} data; point --input at "
                             f"the folder that holds the {split} split, or drop --split")
        base, paths = root.parent, [root]
    else:
        base = root / split if split and (root / split).is_dir() else root
        other_splits = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in KNOWN_SPLITS)
        # Reading the whole tree would silently mix held-out splits into training data.
        if split and base == root and other_splits:
            raise InputError(f"{root}: has no '{split}' folder, only {', '.join(other_splits)}; pass --split")
        if split and base == root and not in_split:
            raise InputError(f"{root}: has no split folders ({', '.join(KNOWN_SPLITS)}), so it has no '{split}' "
                             f"split; point --input at the folder that holds {split} data, or drop --split")
        if not split and other_splits:
            raise InputError(f"{root}: holds the splits {', '.join(other_splits)}; choose one with --split "
                             "(data.split when training from the stream) or point at its folder")
        paths = sorted(p for p in base.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".zst")))
    if not paths:
        raise InputError(f"{base}: no .jsonl or .jsonl.zst files found")
    return [InputFile(str(p.resolve()), p.relative_to(base).as_posix() if p != base else p.name, _size_hint(p))
            for p in paths]


def discover_dataset_shards(dataset: HFDataset) -> list[InputFile]:
    """One input per shard (file) of a streamed dataset: the unit of parallel work, in the dataset's order."""
    count = dataset.load().num_shards
    label = f"{dataset.path}:{dataset.split}"
    return [InputFile(f"{label}[{k}/{count}]", f"{label}/shard_{k:05d}", 0, dataset, k, count) for k in range(count)]


def plan_units(files: list[InputFile], unit_bytes: int) -> list[WorkUnit]:
    """Cut each file into ranges of about `unit_bytes` decompressed bytes; the last range is open-ended."""
    units: list[WorkUnit] = []
    for file_index, f in enumerate(files):
        parts = max(1, -(-f.size_hint // unit_bytes))
        for part in range(parts):
            end = (part + 1) * unit_bytes if part < parts - 1 else None
            units.append(WorkUnit(len(units), file_index, part * unit_bytes, end))
    return units


def auto_unit_bytes(files: list[InputFile], workers: int) -> int:
    """Small enough that every worker gets many units (the last unit of a run keeps one worker busy while the
    others idle), large enough that a unit's fixed cost (skipping to its range, writing its result) is small."""
    total = sum(f.size_hint for f in files)
    target = total // max(1, workers * 32)
    return int(min(8 << 20, max(256 << 10, target)))  # 8 MiB cap: a worker's memory stays that of one unit


def read_unit(f: InputFile, unit: WorkUnit, log: UnitReadLog, sources: frozenset[str] | None = None,
              strict: bool = False) -> Iterator[Document]:
    """Yield the good documents of one unit; every rejected line or file problem goes to `log.bad`."""
    docs = 0

    def reject(line: int, reason: str) -> bool:
        log.bad.append(BadLine(line, reason, docs))
        return strict  # strict: the caller stops at the first bad line

    def keep(doc: Document) -> bool:
        if sources is not None and doc.source not in sources:
            log.filtered[doc.source] = log.filtered.get(doc.source, 0) + 1
            return False
        return True

    if f.dataset is not None:
        for line_no, (doc, reason) in _dataset_records(f):
            if doc is None:
                if reject(line_no, reason or "unreadable record"):
                    return
            elif keep(doc):
                docs += 1
                yield doc
        return

    with open(f.path, "rb") as raw:
        head = raw.read(len(LFS_POINTER_PREFIX))
        raw.seek(0)
        if not head:
            if unit.start == 0:
                reject(0, EMPTY_FILE)
            return
        if head.startswith(LFS_POINTER_PREFIX):
            if unit.start == 0:
                reject(0, LFS_POINTER)  # a Git LFS pointer checked out instead of the data
            return
        stream = _decompressed(raw) if head.startswith(ZSTD_MAGIC) or f.path.endswith(".zst") else _plain(raw)
        seen_any = False
        try:
            for offset, line_no, line in _lines(stream):
                seen_any = True
                if offset < unit.start:
                    continue
                if unit.end is not None and offset >= unit.end:
                    return
                doc, reason = _parse(line)
                if doc is None:
                    if reject(line_no, reason or "unreadable line"):
                        return
                elif keep(doc):
                    docs += 1
                    yield doc
        except CorruptStream as err:
            # Reported by the unit that owns the damaged position, so it is counted exactly once per file.
            owner_start = err.args[0]
            if owner_start >= unit.start and (unit.end is None or owner_start < unit.end):
                reject(err.args[1], CORRUPT_ZST)
            return
        if not seen_any and unit.start == 0:
            reject(0, EMPTY_FILE)  # a valid stream that decompresses to nothing


def _size_hint(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(18)
    if head.startswith(ZSTD_MAGIC):
        try:
            content = zstandard.get_frame_parameters(head).content_size
        except zstandard.ZstdError:
            return size
        if content > 0:
            return content
        return size * 4  # typical text ratio; only scheduling depends on it
    return size


def _plain(raw: BinaryIO) -> Iterator[bytes]:
    for block in iter(lambda: raw.read(READ_BYTES), b""):
        yield block


def _decompressed(raw: BinaryIO) -> Iterator[bytes]:
    """Decompress frame after frame; a frame cut short or damaged raises CorruptStream at its position.

    zstandard's stream_reader returns a clean EOF on a truncated file, so frames are driven by hand and
    completeness is checked with `eof`.
    """
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    produced = 0
    for block in iter(lambda: raw.read(READ_BYTES), b""):
        while block:
            if frame.eof:
                frame = decompressor.decompressobj()
            try:
                out = frame.decompress(block)
            except zstandard.ZstdError as err:
                raise CorruptStream(produced, str(err)) from None
            if out:
                produced += len(out)
                yield out
            block = frame.unused_data if frame.eof else b""
    if not frame.eof:
        raise CorruptStream(produced, "truncated zstd frame")


def _lines(chunks: Iterator[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(decompressed offset, 1-based line number, line without newline); a damaged tail raises CorruptStream
    carrying the offset and number of the line that was being read, so its owner can report it."""
    pending = io.BytesIO()
    pending_start = 0
    offset = 0
    line_no = 1
    try:
        for chunk in chunks:
            begin = 0
            while True:
                nl = chunk.find(b"\n", begin)
                if nl < 0:
                    pending.write(chunk[begin:])
                    break
                if pending.tell():
                    pending.write(chunk[begin:nl])
                    line = pending.getvalue()
                    pending = io.BytesIO()
                else:
                    line = chunk[begin:nl]
                yield pending_start, line_no, line
                line_no += 1
                pending_start = offset + nl + 1
                begin = nl + 1
            offset += len(chunk)
    except CorruptStream:
        raise CorruptStream(pending_start, line_no) from None
    if pending.tell():
        yield pending_start, line_no, pending.getvalue()  # last line without a trailing newline


def _dataset_records(f: InputFile) -> Iterator[tuple[int, tuple[Document | None, str | None]]]:
    assert f.dataset is not None, "a local file has no dataset to load"
    records = f.dataset.load().shard(num_shards=f.num_shards, index=f.shard)
    line_no = 0
    try:
        for line_no, record in enumerate(records, start=1):
            yield line_no, _check_record(record, could_hold_surrogates=True)
    except Exception:  # noqa: BLE001 - any reader failure inside `datasets` loses the rest of this shard
        yield line_no + 1, (None, DATASET_ERROR)


def _parse(line: bytes) -> tuple[Document | None, str | None]:
    if not line.strip():
        return None, BLANK_LINE
    try:
        text_line = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, INVALID_UTF8
    try:
        record = json.loads(text_line)
    except ValueError:
        return None, MALFORMED_JSON
    return _check_record(record, could_hold_surrogates=b"\\ud" in line or b"\\uD" in line)


def _check_record(record, could_hold_surrogates: bool) -> tuple[Document | None, str | None]:
    if not isinstance(record, dict) or "text" not in record:
        return None, MISSING_TEXT
    text = record["text"]
    if not isinstance(text, str):
        return None, NON_STRING_TEXT
    if not text:
        return None, EMPTY_TEXT
    if could_hold_surrogates and _has_surrogates(text):
        return None, INVALID_UTF8  # a \ud800-style escape: valid JSON, but not encodable text
    meta = record.get("meta")
    source = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return Document(text, source if isinstance(source, str) else UNKNOWN_SOURCE), None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
