"""Offline data preparation: raw documents -> tokenized, packed, versioned token shards, in parallel and resumable.

Pipeline: the inputs are planned into work units (see `sources`); worker processes tokenize units into result
files under `OUTPUT/.work/`; the main process packs the results in unit order into shards of a fixed number of
sequences and, after each shard, records where it stands in `.work/state.json`. A killed run, restarted with the
same command, keeps every finished unit and every finished shard and ends byte-identical to an uninterrupted one.
A rerun on a finished output checks the shards (size and header; sha256 with --verify) and rebuilds the damaged
ones from where each started, which `prepare_run.json` records: packing is deterministic, so they come out
byte-identical. One data prep at a time holds an output (a lock on OUTPUT/.lock).
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from shortened.config import ConfigError, PrepareConfig  # noqa: F401  (re-exported: its old home)
from shortened.data.packing import TokenBuffer, doc_starts_from_lengths, source_positions
from shortened.data.prep_stats import PrepStats, describe_bad
from shortened.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    RUN_INFO_NAME,
    ShardHeader,
    ShardWriter,
    shard_problem,
    token_dtype,
    version_hint,
)
from shortened.data.sources import (
    InputError,
    InputFile,
    WorkUnit,
    auto_unit_bytes,
    discover,
    partition_files,
    plan_units,
)
from shortened.data.tokenize_worker import UnitResult, UnitTask, init_worker, load_unit_result, tokenize_unit
from shortened.fsutil import (
    LockHeld,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    fsync_dir,
    remove_stale_temps,
    take_lock,
)
from shortened.tokenizer import Tokenizer, load_tokenizer

WORK_DIR = ".work"
STATE_NAME = "state.json"
RUN_NAME = "run.json"  # .work/run.json: fingerprint and unit size of the run that owns .work, written first
LOCK_NAME = ".lock"  # locked while a data prep runs; left empty afterwards so outputs stay byte-identical
HEAD_TAIL_BYTES = 64 << 10  # hashed at each end of every input file for the fingerprint


class BadInputError(ValueError):
    """--strict met a bad line; the message is `file:line: reason`."""


@dataclass
class PackState:
    """Where packing stands at the last checkpoint (after a finished shard): resume re-reads units from `next_unit`."""

    fingerprint: str
    unit_bytes: int
    shards: list[dict] = field(default_factory=list)
    next_unit: int = 0
    skip_tokens: int = 0  # tokens of `next_unit` already inside finished shards
    stats: dict = field(default_factory=dict)  # PrepStats of the units before `next_unit`
    shard_starts: list[list[int]] = field(default_factory=lambda: [[0, 0]])  # (unit, skip tokens) of each shard
    # --pack-by-source (`_SourcePacker`): the file that holds every source's partial sequence and open shard as of
    # this checkpoint, the number of shards opened (it names their working files) and the shards this checkpoint
    # closed, as [working file, shard file], moved into the output once it is written.
    streams_file: str = ""
    opened: int = 0
    moves: list[list[str]] = field(default_factory=list)


def prepare_shards(config: PrepareConfig) -> dict:
    """Run (or resume, or check and repair, or recognise as done) one preparation; returns the manifest."""
    tokenizer = load_tokenizer(config.tokenizer)
    files = partition_files(discover(config.input, config.split, config.hf_data_files), config.num_partitions,
                            config.partition)
    output = Path(config.output)
    fingerprint = _fingerprint(config, files, tokenizer.sha256)
    with _locked(output):
        done = _existing_manifest(output, fingerprint)
        if done is not None:
            return _check_finished(config, output, done, files, tokenizer)
        return _prepare(config, output, files, tokenizer, fingerprint)


def _prepare(config: PrepareConfig, output: Path, files: list[InputFile], tokenizer: Tokenizer,
             fingerprint: str) -> dict:
    work = output / WORK_DIR
    run = _claim_work(config, output, files, fingerprint)
    # Per source, a shard's start is recorded when it closes (its number is given then); the single stream records
    # where the next shard starts at each checkpoint, the first one at (0, 0).
    state = _load_state(work) or PackState(fingerprint, run["unit_bytes"],
                                           shard_starts=[] if config.pack_by_source else [[0, 0]])
    units = plan_units(files, state.unit_bytes)
    remove_stale_temps(output)  # half-written shards or unit results of a killed run
    remove_stale_temps(work)
    kept_units = len(list(work.glob("unit_*.npz")))
    if state.shards or kept_units:
        _say(config, f"resuming: {len(state.shards)} shard(s) finished, packing from unit {state.next_unit} of "
                     f"{len(units)}, {kept_units} tokenized unit(s) kept")

    started = time.time()
    args = (config, output, work, state, tokenizer.sha256, token_dtype(tokenizer.vocab_size))
    packer = _SourcePacker(*args, num_units=len(units)) if config.pack_by_source else _StreamPacker(*args)
    sizes_known = all(f.size_hint for f in files)  # a streamed dataset has no sizes: count its shards instead
    total = sum(f.size_hint for f in files) if sizes_known else len(units)
    with (_UnitResults(config, files, units, work, state.next_unit) as results,
          _progress(config, total, sizes_known) as bar):
        for unit, result in results:
            packer.consume(unit, files[unit.file_index], result)
            bar.update(_unit_bytes(unit, files[unit.file_index]) if sizes_known else 1)
            bar.set_postfix_str(packer.rate_text(time.time() - started), refresh=False)
            if packer.finished:
                break
    if packer.empty:
        shutil.rmtree(work)
        _say(config, packer.stats.summary())  # what was read and rejected: the evidence for the error that follows
        raise InputError(_why_no_sequence(config, packer.stats))
    manifest = packer.finish(config, tokenizer, files, run, time.time() - started)
    shutil.rmtree(work)
    _say(config, packer.stats.summary() + "\n" + _shard_summary(manifest, output))
    return manifest


def _why_no_sequence(config: PrepareConfig, stats: PrepStats) -> str:
    """A corpus that yields no sequence is an error: training on it would fail later, far from the cause."""
    where = f"{config.input}" + (f" (split {config.split})" if config.split else "")
    if stats.docs_total:
        budget = f" (--max-tokens {config.max_tokens})" if config.max_tokens else ""
        short = (f"no source has the tokens of one sequence of {config.seq_len} (--pack-by-source packs each on its "
                 "own)") if config.pack_by_source else f"fewer than one sequence of {config.seq_len}"
        return (f"{where}: {stats.docs_total:,} document(s), {stats.tokens_total:,} tokens{budget}: {short}; give "
                "more input or a smaller --seq-len")
    if stats.bad:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.bad.items()))
        return f"{where}: no good document, every line or file is bad ({reasons}; first: {stats.bad_examples[0]})"
    if stats.filtered:
        seen = ", ".join(sorted(stats.filtered))
        return f"{where}: --sources {','.join(config.sources or [])} keeps no document; the input has {seen}"
    return f"{where}: no documents"


def _check_finished(config: PrepareConfig, output: Path, manifest: dict, files: list[InputFile],
                    tokenizer: Tokenizer) -> dict:
    """A finished output is trusted only after its shards are checked; damaged shards are rebuilt in place."""
    shutil.rmtree(output / WORK_DIR, ignore_errors=True)  # left if a run was killed right after its manifest
    run_info = _read_run_info(output)
    _note_changed_mtimes(config, run_info.get("input_mtimes"), files, "the shards were prepared")
    damaged = _damaged_shards(output, manifest, config.verify)
    if not damaged:
        how = "size, header and sha256" if config.verify else "size and header; --verify also checks sha256"
        _say(config, f"{output / MANIFEST_NAME} is already complete for these inputs ({len(manifest['shards'])} "
                     f"shard(s) checked: {how}); nothing to do")
        return manifest
    for problem in damaged.values():
        _say(config, f"damaged: {problem}")
    _rebuild(config, output, manifest, sorted(damaged), files, tokenizer, run_info)
    names = ", ".join(manifest["shards"][i]["file"] for i in sorted(damaged))
    _say(config, f"rebuilt {names} (byte-identical to the manifest's sha256); {output} is complete again")
    return manifest


def _damaged_shards(output: Path, manifest: dict, verify: bool) -> dict[int, str]:
    """Shard index -> what is wrong with it: presence, size and header always, sha256 with --verify."""
    expected = (manifest["seq_len"], manifest["dtype"], manifest["tokenizer_sha256"])
    damaged = {}
    for index, entry in enumerate(manifest["shards"]):
        path = output / entry["file"]
        counts = (entry["num_sequences"], entry["num_tokens"], entry["num_docs"])
        error = shard_problem(path, entry["bytes"], counts, expected)
        if error is not None:
            damaged[index] = error.problem  # without its fix: this run is applying it
        elif verify and file_sha256(path) != entry["sha256"]:
            damaged[index] = f"{path}: sha256 differs from {MANIFEST_NAME}"
    return damaged


def _rebuild(config: PrepareConfig, output: Path, manifest: dict, damaged: list[int], files: list[InputFile],
             tokenizer: Tokenizer, run_info: dict) -> None:
    """Repack each damaged shard from where it started; without recorded starts, repack from the first unit."""
    entries = manifest["shards"]
    starts, unit_bytes = run_info.get("shard_starts"), run_info.get("unit_bytes")
    if isinstance(starts, list) and len(starts) == len(entries) and unit_bytes:
        plans = [(tuple(starts[k]), _stream_shards(entries, entries[k].get("source"), k), {k}) for k in damaged]
    else:  # prepare_run.json lost: the output does not depend on the unit size, so any will do
        _say(config, f"{output / RUN_INFO_NAME} is missing or incomplete: repacking from the start of the inputs")
        unit_bytes = config.unit_bytes or auto_unit_bytes(files, config.workers)
        streams: dict[str | None, set[int]] = {}  # per source, with --pack-by-source
        for k in damaged:
            streams.setdefault(entries[k].get("source"), set()).add(k)
        plans = [((0, 0), _stream_shards(entries, source), wanted) for source, wanted in streams.items()]
    work = output / WORK_DIR
    work.mkdir()
    units = plan_units(files, unit_bytes)
    repacker = _Repacker(config, output, work, manifest, tokenizer.sha256, token_dtype(tokenizer.vocab_size))
    try:
        for (first_unit, skip), shards, wanted in plans:
            with _UnitResults(config, files, units, work, first_unit) as results:
                repacker.run(results, first_unit, skip, shards, wanted)
    finally:
        shutil.rmtree(work)  # unit results and a refused rebuild: nothing in it is part of the output


def _stream_shards(entries: list[dict], source: str | None, start: int = 0) -> list[int]:
    """The shards, from `start` on, of one packing stream: every shard (source None), or with --pack-by-source
    those of one source."""
    return [k for k in range(start, len(entries)) if entries[k].get("source") == source]


def _stream_tokens(result: UnitResult, source: str | None, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """A unit's tokens from position `offset` on in one packing stream (every document, or one source's), and the
    starts of their documents among them."""
    if source is None:
        starts = doc_starts_from_lengths(result.doc_lens)
        first_doc = int(np.searchsorted(starts, offset))
        return result.tokens[offset:], starts[first_doc:] - offset
    if source not in result.source_names:
        return result.tokens[:0], np.zeros(0, np.int64)
    index = result.source_names.index(source)
    positions, starts = source_positions(result.doc_lens, result.doc_source, index, offset)
    return result.tokens[positions], starts


class _Repacker:
    """Packs unit results exactly as the packer did, from a recorded shard start, and writes only wanted shards.

    A rebuilt shard replaces the damaged file only if its sha256 equals the manifest's: if the inputs changed
    in a way the fingerprint missed, the rebuild is refused rather than mixing two versions of the corpus.
    """

    def __init__(self, config: PrepareConfig, output: Path, work: Path, manifest: dict, tokenizer_sha256: str,
                 dtype: np.dtype) -> None:
        self.config, self.output, self.work, self.entries = config, output, work, manifest["shards"]
        self.tokenizer_sha256, self.dtype = tokenizer_sha256, dtype

    def run(self, results: _UnitResults, first_unit: int, skip: int, shards: list[int], wanted: set[int]) -> None:
        """Repack `shards`, one stream's shards in order (see `_stream_shards`), the first from (first_unit, skip)."""
        source = self.entries[shards[0]].get("source")
        buffer = TokenBuffer(self.dtype)
        following = iter(shards)
        shard, writer, written = next(following), None, 0
        for unit, result in results:
            buffer.append(*_stream_tokens(result, source, skip if unit.index == first_unit else 0))
            Path(results.tasks[unit.index].result_path).unlink()
            while len(buffer) >= self.config.seq_len:
                size = self.entries[shard]["num_tokens"]
                whole = len(buffer) // self.config.seq_len * self.config.seq_len
                chunk = buffer.pop(min(whole, size - written))
                if shard in wanted:
                    writer = writer or ShardWriter(self.work / self.entries[shard]["file"], self.config.seq_len,
                                                   self.dtype, self.tokenizer_sha256)
                    writer.write(*chunk)
                written += len(chunk[0])
                if written == size:
                    if writer is not None:
                        self._replace(writer)
                    if shard == max(wanted):
                        return
                    shard, writer, written = next(following), None, 0
        raise InputError(f"{self.config.input}: the inputs end before {self.entries[shard]['file']} is complete: "
                         f"they changed since {self.output} was prepared; prepare into a new --output")

    def _replace(self, writer: ShardWriter) -> None:
        writer.close()
        entry = next(e for e in self.entries if e["file"] == writer.path.name)
        if file_sha256(writer.path) != entry["sha256"]:
            writer.path.unlink()
            raise InputError(f"{self.config.input}: rebuilding {self.output / entry['file']} gave other bytes than "
                             f"the manifest's sha256: the inputs changed since {self.output} was prepared (an edit "
                             "the fingerprint cannot see); prepare into a new --output")
        os.replace(writer.path, self.output / entry["file"])
        fsync_dir(self.output)


class _Packer(ABC):
    """Consumes unit results in order: counts them, applies --max-tokens, packs the kept documents (`_pack`: one
    stream, or one per source) and writes `prepare_run.json` and the manifest at the end."""

    def __init__(self, config: PrepareConfig, output: Path, work: Path, state: PackState, tokenizer_sha256: str,
                 dtype: np.dtype) -> None:
        self.config, self.output, self.work, self.state = config, output, work, state
        self.tokenizer_sha256, self.dtype = tokenizer_sha256, dtype
        self.capacity = config.sequences_per_shard * config.seq_len  # tokens per shard
        self.stats = PrepStats.from_dict(state.stats) if state.stats else PrepStats()
        self.finished = False
        self._docs_at_start = self.stats.docs_total
        self._tokens_at_start = self.stats.tokens_total

    @property
    @abstractmethod
    def empty(self) -> bool:
        """No sequence was packed at all."""

    def consume(self, unit: WorkUnit, file: InputFile, result: UnitResult) -> None:
        stats_before_unit = self.stats.to_dict()
        keep_docs = self._docs_within_budget(result.doc_lens)
        doc_lens = result.doc_lens[:keep_docs]
        bad = [b for b in result.bad if b.docs_before < keep_docs or keep_docs == len(result.doc_lens)]
        if self.config.strict and bad:
            raise BadInputError(describe_bad(file.name, bad[0]))
        self.stats.add_documents(doc_lens, result.doc_bytes[:keep_docs], result.doc_source[:keep_docs],
                                 result.source_names)
        self.stats.add_bad(file.name, bad)
        self.stats.add_filtered(result.filtered)
        if keep_docs < len(result.doc_lens):
            self.finished = True
        self._pack(unit, result, doc_lens, stats_before_unit)

    @abstractmethod
    def _pack(self, unit: WorkUnit, result: UnitResult, doc_lens: np.ndarray, stats_before_unit: dict) -> None:
        """Pack the unit's first len(doc_lens) documents (those within --max-tokens)."""

    @abstractmethod
    def finish(self, config: PrepareConfig, tokenizer: Tokenizer, files: list[InputFile], run: dict,
               seconds: float) -> dict:
        """Close the last shard(s), drop what is less than a sequence, write prepare_run.json and the manifest."""

    def rate_text(self, seconds: float) -> str:
        seconds = max(seconds, 1e-9)
        docs = self.stats.docs_total - self._docs_at_start
        tokens = self.stats.tokens_total - self._tokens_at_start
        return f"{docs / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tok/s"

    def _docs_within_budget(self, doc_lens: np.ndarray) -> int:
        if not self.config.max_tokens:
            return len(doc_lens)
        remaining = self.config.max_tokens - self.stats.tokens_total
        if remaining <= 0:
            return 0
        cumulative = np.cumsum(doc_lens)
        return min(len(doc_lens), int(np.searchsorted(cumulative, remaining)) + 1)

    def _shard_entry(self, path: Path, name: str, header: ShardHeader) -> dict:
        """The manifest entry of the closed shard at `path`, which will be OUTPUT/name."""
        return {
            "file": name,
            "sha256": file_sha256(path),
            "num_sequences": header.num_sequences,
            "num_tokens": header.num_tokens,
            "num_docs": header.num_docs,
            "bytes": path.stat().st_size,
        }

    def _save_state(self, unit_index: int, skip_tokens: int, stats: dict) -> None:
        self.state.next_unit, self.state.skip_tokens, self.state.stats = unit_index, skip_tokens, stats
        atomic_write_json(vars(self.state), self.work / STATE_NAME)
        for path in self.work.glob("unit_*.npz"):
            if _unit_index(path) < unit_index:
                path.unlink()  # fully inside finished shards (or, per source, in the state just saved)

    def _write_manifest(self, config: PrepareConfig, tokenizer: Tokenizer, files: list[InputFile], run: dict,
                        seconds: float, dropped: dict) -> dict:
        """`dropped`: the manifest's account of the tokens left out of every sequence (`tokens_dropped`, ...)."""
        shards = self.state.shards
        # Before the manifest, so that every complete output can locate (and rebuild) each of its shards.
        atomic_write_json({
            "command": sys.argv, "workers": config.workers, "unit_bytes": self.state.unit_bytes,
            "seconds": round(seconds, 3), "shard_starts": self.state.shard_starts[: len(shards)],
            "input_mtimes": run["input_mtimes"],
        }, self.output / RUN_INFO_NAME)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "shard_format_version": FORMAT_VERSION,
            "fingerprint": run["fingerprint"],
            "seq_len": config.seq_len,
            "dtype": self.dtype.name,
            "num_sequences": sum(s["num_sequences"] for s in shards),
            "tokens_total": self.stats.tokens_total,
            "tokens_in_sequences": sum(s["num_tokens"] for s in shards),
            **dropped,
            "docs_total": self.stats.docs_total,
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "sources": self.stats.sources,
            "filtered": self.stats.filtered,
            "bad": self.stats.bad,
            "bad_by_file": self.stats.bad_by_file,
            "bad_examples": self.stats.bad_examples,
            "max_tokens": config.max_tokens,
            "inputs": [{"file": f.name} for f in files],
            "shards": shards,
        }
        if config.num_partitions > 1:  # what data_prep/merge_shards.py checks: every part, each once
            manifest["partition"] = {"index": config.partition, "of": config.num_partitions}
        atomic_write_json(manifest, self.output / MANIFEST_NAME)  # last: its presence means the output is complete
        return manifest


class _StreamPacker(_Packer):
    """Every document in one stream: whole sequences go into the open shard, and a checkpoint follows each shard.

    Memory holds one unit's result and less than one sequence of carry-over, whatever the shard or corpus size.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.buffer = TokenBuffer(self.dtype)
        self.writer: ShardWriter | None = None

    @property
    def empty(self) -> bool:
        return not self.state.shards and self.writer is None

    def _pack(self, unit: WorkUnit, result: UnitResult, doc_lens: np.ndarray, stats_before_unit: dict) -> None:
        kept_tokens = int(doc_lens.sum())
        skip = self.state.skip_tokens if unit.index == self.state.next_unit else 0
        starts = doc_starts_from_lengths(doc_lens)
        first_doc = int(np.searchsorted(starts, skip))
        self.buffer.append(result.tokens[skip:kept_tokens], starts[first_doc:] - skip)
        while len(self.buffer) >= self.config.seq_len:
            writer = self._open_writer()
            whole = len(self.buffer) // self.config.seq_len * self.config.seq_len
            writer.write(*self.buffer.pop(min(whole, self.capacity - writer.num_tokens)))
            if writer.num_tokens == self.capacity:
                self._close_shard()
                # A shard closes after at least one sequence of this unit went into it, so what stays buffered
                # is a suffix of this unit: resume re-reads the unit from there.
                self._checkpoint(unit.index, kept_tokens - len(self.buffer), stats_before_unit)

    def finish(self, config: PrepareConfig, tokenizer: Tokenizer, files: list[InputFile], run: dict,
               seconds: float) -> dict:
        dropped = len(self.buffer)  # less than one sequence: the final partial sequence
        if self.writer is not None:
            self._close_shard()
        return self._write_manifest(config, tokenizer, files, run, seconds, {"tokens_dropped": dropped})

    def _open_writer(self) -> ShardWriter:
        if self.writer is None:
            name = f"shard_{len(self.state.shards):05d}.bin"
            self.writer = ShardWriter(self.output / name, self.config.seq_len, self.dtype, self.tokenizer_sha256)
        return self.writer

    def _close_shard(self) -> None:
        assert self.writer is not None, "no shard is open"
        header = self.writer.close()
        self.state.shards.append(self._shard_entry(self.writer.path, self.writer.path.name, header))
        self.writer = None

    def _checkpoint(self, unit_index: int, skip_tokens: int, stats_before_unit: dict) -> None:
        self.state.shard_starts.append([unit_index, skip_tokens])  # where the next shard starts
        self._save_state(unit_index, skip_tokens, stats_before_unit)


@dataclass
class _SourceStream:
    """One source under --pack-by-source: its partial sequence, its open shard, and the (unit, position) in the
    input of that shard's first token, recorded for rebuilds."""

    buffer: TokenBuffer
    start: list[int]
    writer: ShardWriter | None = None


@dataclass(frozen=True)
class _Filled:
    """A shard to close. `order` places it among those closed together: the position of its last token in the unit
    that filled it, or, for the last shards at the end, its source's rank by name."""

    order: int
    source: str
    writer: ShardWriter
    start: list[int]


class _SourcePacker(_Packer):
    """--pack-by-source: a stream per source, so that every sequence and every shard holds documents of one source.

    Shards are numbered in the order in which their last token appears in the input, and the last shard of each
    source, at the end, in source-name order: the numbering depends on the input alone, never on unit sizes or
    workers. A source's open shard spans many units, so it grows in a fixed-name file in `.work` (`open_NNNNN.bin`)
    instead of a temporary one, and each checkpoint, at the end of a unit in which a shard filled, saves every
    source's partial sequence and its open shard's document starts and CRCs (`streams_NNNNN.npz`, binary: ~5 MB
    and ~10 ms at 2^27-token shards, where JSON would cost the main process ~0.6 s per checkpoint). A resumed run
    cuts each open shard back to its checkpoint and continues after that unit. A filled shard is closed in place,
    recorded by the checkpoint, and only then moved into the output: until that checkpoint is written, resume still
    finds it.
    """

    def __init__(self, *args: Any, num_units: int) -> None:
        super().__init__(*args)
        self.num_units = num_units
        self._finish_moves()
        self.streams = self._restore_streams()

    @property
    def empty(self) -> bool:
        return not self.state.shards and all(s.writer is None for s in self.streams.values())

    def _pack(self, unit: WorkUnit, result: UnitResult, doc_lens: np.ndarray, stats_before_unit: dict) -> None:
        filled: list[_Filled] = []
        for index, name in enumerate(result.source_names):
            positions, doc_starts = source_positions(doc_lens, result.doc_source[: len(doc_lens)], index)
            if len(positions):  # a source may have documents only beyond --max-tokens
                filled += self._fill(name, unit.index, result.tokens[positions], doc_starts, positions)
        if filled:
            self._settle(filled, unit.index + 1)

    def finish(self, config: PrepareConfig, tokenizer: Tokenizer, files: list[InputFile], run: dict,
               seconds: float) -> dict:
        last = [_Filled(rank, name, stream.writer, stream.start)
                for rank, (name, stream) in enumerate(sorted(self.streams.items())) if stream.writer is not None]
        for stream in self.streams.values():
            stream.writer = None
        if last:  # a checkpoint like any other: a run killed before the manifest resumes with nothing left to pack
            self._settle(last, self.num_units)
        dropped = {name: len(stream.buffer) for name, stream in sorted(self.streams.items())}
        return self._write_manifest(config, tokenizer, files, run, seconds, {
            "tokens_dropped": sum(dropped.values()), "pack_by_source": True, "tokens_dropped_by_source": dropped})

    def _fill(self, name: str, unit_index: int, tokens: np.ndarray, doc_starts: np.ndarray,
              positions: np.ndarray) -> list[_Filled]:
        """Append one source's tokens of a unit and pop its whole sequences into its open shard."""
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = _SourceStream(TokenBuffer(self.dtype), [unit_index, int(positions[0])])
        carry = len(stream.buffer)
        stream.buffer.append(tokens, doc_starts)
        popped, filled = 0, []
        while len(stream.buffer) >= self.config.seq_len:
            writer = stream.writer = stream.writer or self._open_writer()
            whole = len(stream.buffer) // self.config.seq_len * self.config.seq_len
            count = min(whole, self.capacity - writer.num_tokens)
            writer.write(*stream.buffer.pop(count))
            popped += count
            if writer.num_tokens == self.capacity:
                # A shard fills with at least one sequence of this unit, more than the carry: its last token is
                # one of this unit's.
                last = int(positions[popped - carry - 1])
                filled.append(_Filled(last, name, writer, stream.start))
                stream.writer, stream.start = None, [unit_index, last + 1]
        return filled

    def _open_writer(self) -> ShardWriter:
        path = self.work / f"open_{self.state.opened:05d}.bin"
        self.state.opened += 1
        return ShardWriter(path, self.config.seq_len, self.dtype, self.tokenizer_sha256, in_place=True)

    def _settle(self, filled: list[_Filled], next_unit: int) -> None:
        """Close the filled shards in input order, each in place, checkpoint, then move them into the output."""
        moves = []
        for shard in sorted(filled, key=lambda f: f.order):
            name = f"shard_{len(self.state.shards):05d}.bin"
            header = shard.writer.close()
            entry = self._shard_entry(shard.writer.path, name, header)
            self.state.shards.append({**entry, "source": shard.source})
            self.state.shard_starts.append(shard.start)
            moves.append([shard.writer.path.name, name])
        self.state.moves = moves
        self._checkpoint(next_unit)
        self._finish_moves()

    def _checkpoint(self, next_unit: int) -> None:
        name = f"streams_{len(self.state.shards):05d}.npz"  # a shard closed since the last checkpoint: a new name
        atomic_write_bytes(self._streams_blob(), self.work / name)
        self.state.streams_file = name
        self._save_state(next_unit, 0, self.stats.to_dict())
        for path in self.work.glob("streams_*.npz"):
            if path.name != name:
                path.unlink()

    def _finish_moves(self) -> None:
        """Move the shards the last checkpoint closed into the output; after a crash, those not moved yet."""
        for working, name in self.state.moves:
            if (self.work / working).exists():
                os.replace(self.work / working, self.output / name)
                fsync_dir(self.output)

    def _streams_blob(self) -> bytes:
        """Every source's partial sequence and open shard (synced to disk first), for `_restore_streams`."""
        meta: list[dict] = []
        arrays: dict[str, Any] = {}  # by the stream's rank in source-name order: a name may hold any character
        for i, (name, stream) in enumerate(sorted(self.streams.items())):
            arrays[f"tokens_{i}"], arrays[f"doc_starts_{i}"] = stream.buffer.contents()
            writer = None
            if stream.writer is not None:
                arrays[f"shard_doc_starts_{i}"], arrays[f"shard_crcs_{i}"] = stream.writer.sync()
                writer = stream.writer.path.name
            meta.append({"name": name, "start": stream.start, "writer": writer})
        blob = io.BytesIO()
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez(blob, **arrays)
        return blob.getvalue()

    def _restore_streams(self) -> dict[str, _SourceStream]:
        """The streams as the last checkpoint saved them; none on a fresh start."""
        if not self.state.streams_file:
            return {}
        streams = {}
        with np.load(self.work / self.state.streams_file) as saved:
            for i, record in enumerate(json.loads(str(saved["meta"]))):
                stream = _SourceStream(TokenBuffer(self.dtype), record["start"])
                stream.buffer.append(saved[f"tokens_{i}"], saved[f"doc_starts_{i}"])
                if record["writer"]:
                    synced = (saved[f"shard_doc_starts_{i}"], saved[f"shard_crcs_{i}"])
                    stream.writer = ShardWriter(self.work / record["writer"], self.config.seq_len, self.dtype,
                                                self.tokenizer_sha256, in_place=True, synced=synced)
                streams[record["name"]] = stream
        return streams


class _UnitResults:
    """Yields (unit, result) in unit order from `first` on, computing missing results on a worker pool.

    At most a window of units runs ahead of the packer, so a slow unit cannot make finished results pile up
    on disk without bound.
    """

    def __init__(self, config: PrepareConfig, files: list[InputFile], units: list[WorkUnit], work: Path,
                 first: int) -> None:
        self.config, self.files, self.units, self.work, self.first = config, files, units, work, first
        sources = frozenset(config.sources) if config.sources else None
        self.tasks = [UnitTask(files[u.file_index], u, str(work / f"unit_{u.index:07d}.npz"), sources, config.strict)
                      for u in units]
        self.pool: Pool | None = None

    def __enter__(self) -> "_UnitResults":
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        self.pool = context.Pool(self.config.workers, initializer=init_worker, initargs=(self.config.tokenizer,))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __iter__(self) -> Iterator[tuple[WorkUnit, UnitResult]]:
        assert self.pool is not None, "used outside its `with` block"
        window = 4 * self.config.workers
        pending: dict[int, AsyncResult] = {}
        next_submit = self.first
        for index in range(self.first, len(self.units)):
            while next_submit < len(self.units) and next_submit < index + window:
                task = self.tasks[next_submit]
                if not Path(task.result_path).exists():  # finished by an earlier, interrupted run
                    pending[next_submit] = self.pool.apply_async(tokenize_unit, (task,))
                next_submit += 1
            if index in pending:
                pending.pop(index).get()
            yield self.units[index], load_unit_result(self.tasks[index].result_path)


def _fingerprint(config: PrepareConfig, files: list[InputFile], tokenizer_sha256: str) -> str:
    """What the output depends on; a rerun with the same fingerprint resumes or is recognised as done.

    Inputs count by content, not by place or time: relative name, size and a hash of the first and last 64 KiB
    (a zstd frame with a content checksum ends in it, so any change to its text changes the tail). mtime is left
    out: a copied corpus is the same input, and the manifest stays the same on every copy.
    """
    identity = {
        "format": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "seq_len": config.seq_len,
        "sources": sorted(config.sources) if config.sources else None,
        "max_tokens": config.max_tokens,
        "shard_tokens": config.shard_tokens,
        "strict": config.strict,
        "inputs": [_input_identity(f) for f in files],
    }
    # Only when set: an unpartitioned output, packed in one stream, keeps the fingerprint it always had.
    if config.num_partitions > 1:
        identity["partition"] = [config.partition, config.num_partitions]
    if config.pack_by_source:
        identity["pack_by_source"] = True
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _input_identity(f: InputFile) -> list:
    if f.dataset:
        return [f.name, f.size_hint]
    size = os.path.getsize(f.path)
    digest = hashlib.sha256()
    with open(f.path, "rb") as handle:
        digest.update(handle.read(HEAD_TAIL_BYTES))
        if size > HEAD_TAIL_BYTES:
            handle.seek(max(HEAD_TAIL_BYTES, size - HEAD_TAIL_BYTES))
            digest.update(handle.read())
    return [f.name, size, digest.hexdigest()]


def _input_mtimes(files: list[InputFile]) -> dict[str, int]:
    return {f.name: os.stat(f.path).st_mtime_ns for f in files if not f.dataset}


def _note_changed_mtimes(config: PrepareConfig, recorded: dict | None, files: list[InputFile], since: str) -> None:
    """mtime is no part of the fingerprint (see there), but a changed one is said, never passed over in silence."""
    if not recorded:
        return
    changed = [name for name, mtime in _input_mtimes(files).items() if recorded.get(name) != mtime]
    if changed:
        _say(config, f"note: {len(changed)} input file(s) have another mtime than when {since} (first: "
                     f"{changed[0]}); size and first/last {HEAD_TAIL_BYTES >> 10} KiB are unchanged, so they count "
                     "as the same input (a copy). An edit that keeps those is not detected: if you edited the "
                     "corpus, prepare into a new --output")


@contextmanager
def _locked(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT for the whole run: two preps into one output would overwrite each other's
    shards and delete each other's `.work/`. The kernel drops the lock when the process dies, however it dies.

    A POSIX lock (lockf) rather than flock: forked tokenizer workers do not inherit it, so a main process killed
    alone does not leave its lock held by orphaned workers; it also holds across NFS clients."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        handle = take_lock(output / LOCK_NAME, posix=True)
    except LockHeld as held:
        raise ConfigError(f"{output} is in use by another data prep ({held.holder}); wait for it or choose another "
                          "--output") from None
    except OSError as err:
        raise ConfigError(f"{output}: cannot create the output there ({err.strerror}); choose another --output"
                          ) from None
    try:
        yield
    finally:
        handle.truncate(0)
        handle.close()


def _existing_manifest(output: Path, fingerprint: str) -> dict | None:
    path = output / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        recorded, shard_version = manifest["fingerprint"], manifest["shard_format_version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable manifest ({err}); move {output} aside and prepare into a new "
                          "--output") from None
    if shard_version != FORMAT_VERSION:
        raise ConfigError(f"{output}: holds shards of format version {shard_version}; {version_hint(shard_version)}")
    if recorded != fingerprint:
        raise ConfigError(
            f"{output}: already holds shards prepared from other inputs or settings; choose another --output"
        )
    return manifest


def _claim_work(config: PrepareConfig, output: Path, files: list[InputFile], fingerprint: str) -> dict:
    """The identity of the run that owns OUTPUT/.work: an interrupted run of these inputs is resumed (its unit
    results were cut with its unit size, whatever --workers is now); whatever else .work holds is refused."""
    path = output / WORK_DIR / RUN_NAME
    if path.is_file():
        try:
            run = json.loads(path.read_text())
            recorded = run["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); delete {path.parent} to start over") from None
        if recorded != fingerprint:
            raise ConfigError(f"{path.parent}: an interrupted run with other inputs or settings; delete "
                              f"{path.parent} to start over")
        _note_changed_mtimes(config, run.get("input_mtimes"), files, "the interrupted run started")
        return run
    if path.parent.is_dir() and any(path.parent.iterdir()):
        raise ConfigError(f"{path.parent}: left by a data prep of unknown inputs; delete {path.parent} to start over")
    _refuse_stale_shards(output)
    run = {"fingerprint": fingerprint, "unit_bytes": config.unit_bytes or auto_unit_bytes(files, config.workers),
           "input_mtimes": _input_mtimes(files)}
    atomic_write_json(run, path)  # first: from here on, what lies in OUTPUT belongs to this run
    return run


def _refuse_stale_shards(output: Path) -> None:
    """Shards without a manifest or a resumable run are another preparation's: some would be overwritten, the
    rest would lie beside the new manifest."""
    stale = sorted(p.name for p in output.glob("shard_*.bin"))
    if stale:
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        raise ConfigError(f"{output}: holds shard files but no {MANIFEST_NAME} and no interrupted run of these "
                          f"inputs to resume ({shown}); move them away or choose another --output")


def _load_state(work: Path) -> PackState | None:
    """Where the interrupted run owning `work` (see `_claim_work`) stands after its last finished shard."""
    path = work / STATE_NAME
    if not path.exists():
        return None
    try:
        return PackState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable resume state ({err}); delete {work} to start over") from None


def _read_run_info(output: Path) -> dict:
    try:
        info = json.loads((output / RUN_INFO_NAME).read_text())
    except (OSError, ValueError):
        return {}  # only rebuilding needs it, and it falls back to repacking from the start
    return info if isinstance(info, dict) else {}


def _unit_index(path: Path) -> int:
    return int(path.stem.split("_")[1])


def _unit_bytes(unit: WorkUnit, file: InputFile) -> int:
    end = file.size_hint if unit.end is None else min(unit.end, file.size_hint)
    return max(0, end - unit.start)


def _progress(config: PrepareConfig, total: int, in_bytes: bool) -> tqdm:
    return tqdm(total=total, unit="B" if in_bytes else " shards", unit_scale=in_bytes, desc="tokenizing",
                disable=not config.progress, smoothing=0.1, dynamic_ncols=True)


def _shard_summary(manifest: dict, output: Path) -> str:
    tail = "the final partial sequence" + (" of each source" if manifest.get("pack_by_source") else "")
    return (f"{manifest['num_sequences']:,} sequences of {manifest['seq_len']} tokens in {len(manifest['shards'])} "
            f"shard(s); {manifest['tokens_dropped']:,} tokens of {tail} dropped\n"
            f"manifest: {output / MANIFEST_NAME}")


def _say(config: PrepareConfig, text: str) -> None:
    if config.verbose:
        print(text, flush=True)
