"""Offline data preparation: raw documents -> tokenized, packed, versioned token shards, in parallel and resumable.

Pipeline: the inputs are planned into work units (see `sources`); worker processes tokenize units into result
files under `OUTPUT/.work/`; the main process packs the results in unit order into shards of a fixed number of
sequences and, after each shard, records where it stands in `.work/state.json`. A killed run, restarted with the
same command, keeps every finished unit and every finished shard and ends byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from shortened.config import ConfigError
from shortened.data.packing import TokenBuffer, doc_starts_from_lengths
from shortened.data.prep_stats import PrepStats, describe_bad
from shortened.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ShardWriter,
    token_dtype,
)
from shortened.data.sources import InputFile, WorkUnit, auto_unit_bytes, discover, plan_units
from shortened.data.tokenize_worker import UnitResult, UnitTask, init_worker, load_unit_result, tokenize_unit
from shortened.fsutil import atomic_write_json, file_sha256, remove_stale_temps
from shortened.tokenizer import load_tokenizer

WORK_DIR = ".work"
STATE_NAME = "state.json"
RUN_INFO_NAME = "prepare_run.json"  # timings and command: kept out of the manifest so it stays byte-identical


class BadInputError(ValueError):
    """--strict met a bad line; the message is `file:line: reason`."""


@dataclass
class PrepareConfig:
    input: str
    tokenizer: str
    output: str
    seq_len: int = 2048
    workers: int = 1
    split: str | None = None
    sources: list[str] | None = None  # keep only these meta.redpajama_set_name values
    max_tokens: int = 0  # stop after the document that reaches this many tokens (0: everything)
    strict: bool = False
    shard_tokens: int = 1 << 27  # about 256 MiB of uint16 tokens per shard
    unit_bytes: int = 0  # decompressed bytes per work unit (0: chosen from the corpus size and workers)
    hf_data_files: list[str] | None = None  # with an hf:// input naming a builder such as json
    progress: bool = True  # the live progress bar
    verbose: bool = True  # resume notes and the final summary

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {self.max_tokens}")
        if self.shard_tokens < self.seq_len:
            raise ConfigError(f"--shard-tokens ({self.shard_tokens}) must hold one sequence ({self.seq_len})")

    @property
    def sequences_per_shard(self) -> int:
        return self.shard_tokens // self.seq_len


@dataclass
class PackState:
    """Where packing stands after the last finished shard: resume re-reads units from `next_unit`."""

    fingerprint: str
    unit_bytes: int
    shards: list[dict] = field(default_factory=list)
    next_unit: int = 0
    skip_tokens: int = 0  # tokens of `next_unit` already inside finished shards
    stats: dict = field(default_factory=dict)  # PrepStats of the units before `next_unit`


def prepare_shards(config: PrepareConfig) -> dict:
    """Run (or resume, or recognise as done) one preparation; returns the manifest."""
    tokenizer = load_tokenizer(config.tokenizer)
    files = discover(config.input, config.split, config.hf_data_files)
    output = Path(config.output)
    work = output / WORK_DIR
    fingerprint = _fingerprint(config, files, tokenizer.sha256)

    done = _existing_manifest(output, fingerprint)
    if done is not None:
        shutil.rmtree(work, ignore_errors=True)  # left if a run was killed right after its manifest
        _say(config, f"{output / MANIFEST_NAME} is already complete for these inputs; nothing to do")
        return done

    work.mkdir(parents=True, exist_ok=True)
    state = _load_state(work, fingerprint) or PackState(
        fingerprint, config.unit_bytes or auto_unit_bytes(files, config.workers)
    )
    units = plan_units(files, state.unit_bytes)
    remove_stale_temps(output)  # half-written shards or unit results of a killed run
    remove_stale_temps(work)
    kept_units = len(list(work.glob("unit_*.npz")))
    if state.shards or kept_units:
        _say(config, f"resuming: {len(state.shards)} shard(s) finished, packing from unit {state.next_unit} of "
                     f"{len(units)}, {kept_units} tokenized unit(s) kept")

    started = time.time()
    packer = _Packer(config, output, work, state, tokenizer.sha256, token_dtype(tokenizer.vocab_size))
    sizes_known = all(f.size_hint for f in files)  # a streamed dataset has no sizes: count its shards instead
    total = sum(f.size_hint for f in files) if sizes_known else len(units)
    with _UnitResults(config, files, units, work, state.next_unit) as results, _progress(config, total, sizes_known) as bar:
        for unit, result in results:
            packer.consume(unit, files[unit.file_index], result)
            bar.update(_unit_bytes(unit, files[unit.file_index]) if sizes_known else 1)
            bar.set_postfix_str(packer.rate_text(time.time() - started), refresh=False)
            if packer.finished:
                break
    manifest = packer.finish(config, tokenizer, files, fingerprint)
    atomic_write_json({
        "command": sys.argv, "workers": config.workers, "unit_bytes": state.unit_bytes,
        "seconds": round(time.time() - started, 3),
    }, output / RUN_INFO_NAME)
    shutil.rmtree(work)
    _say(config, packer.stats.summary() + "\n" + _shard_summary(manifest, output))
    return manifest


class _Packer:
    """Consumes unit results in order, streams whole sequences into the open shard, checkpoints after each shard.

    Memory holds one unit's result and less than one sequence of carry-over, whatever the shard or corpus size.
    """

    def __init__(self, config: PrepareConfig, output: Path, work: Path, state: PackState, tokenizer_sha256: str,
                 dtype: np.dtype) -> None:
        self.config, self.output, self.work, self.state = config, output, work, state
        self.tokenizer_sha256, self.dtype = tokenizer_sha256, dtype
        self.stats = PrepStats.from_dict(state.stats) if state.stats else PrepStats()
        self.buffer = TokenBuffer(dtype)
        self.writer: ShardWriter | None = None
        self.finished = False
        self._docs_at_start = self.stats.docs_total
        self._tokens_at_start = self.stats.tokens_total

    def consume(self, unit: WorkUnit, file: InputFile, result: UnitResult) -> None:
        stats_before_unit = self.stats.to_dict()
        keep_docs = self._docs_within_budget(result.doc_lens)
        doc_lens = result.doc_lens[:keep_docs]
        kept_tokens = int(doc_lens.sum())
        bad = [b for b in result.bad if b.docs_before < keep_docs or keep_docs == len(result.doc_lens)]
        if self.config.strict and bad:
            raise BadInputError(describe_bad(file.name, bad[0]))
        self.stats.add_documents(doc_lens, result.doc_bytes[:keep_docs], result.doc_source[:keep_docs],
                                 result.source_names)
        self.stats.add_bad(file.name, bad)
        self.stats.add_filtered(result.filtered)
        if keep_docs < len(result.doc_lens):
            self.finished = True

        skip = self.state.skip_tokens if unit.index == self.state.next_unit else 0
        starts = doc_starts_from_lengths(doc_lens)
        first_doc = int(np.searchsorted(starts, skip))
        self.buffer.append(result.tokens[skip:kept_tokens], starts[first_doc:] - skip)
        capacity = self.config.sequences_per_shard * self.config.seq_len
        while len(self.buffer) >= self.config.seq_len:
            writer = self._open_writer()
            whole = len(self.buffer) // self.config.seq_len * self.config.seq_len
            writer.write(*self.buffer.pop(min(whole, capacity - writer.num_tokens)))
            if writer.num_tokens == capacity:
                self._close_shard()
                # A shard closes after at least one sequence of this unit went into it, so what stays buffered
                # is a suffix of this unit: resume re-reads the unit from there.
                self._checkpoint(unit.index, kept_tokens - len(self.buffer), stats_before_unit)

    def finish(self, config: PrepareConfig, tokenizer, files: list[InputFile], fingerprint: str) -> dict:
        dropped = len(self.buffer)  # less than one sequence: the final partial sequence
        if self.writer is not None:
            self._close_shard()
        shards = self.state.shards
        manifest = {
            "format_version": MANIFEST_VERSION,
            "shard_format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "seq_len": config.seq_len,
            "dtype": self.dtype.name,
            "num_sequences": sum(s["num_sequences"] for s in shards),
            "tokens_total": self.stats.tokens_total,
            "tokens_in_sequences": sum(s["num_tokens"] for s in shards),
            "tokens_dropped": dropped,
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
        atomic_write_json(manifest, self.output / MANIFEST_NAME)  # last: its presence means the output is complete
        return manifest

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

    def _open_writer(self) -> ShardWriter:
        if self.writer is None:
            name = f"shard_{len(self.state.shards):05d}.bin"
            self.writer = ShardWriter(self.output / name, self.config.seq_len, self.dtype, self.tokenizer_sha256)
        return self.writer

    def _close_shard(self) -> None:
        header = self.writer.close()
        name = self.writer.path.name
        self.writer = None
        self.state.shards.append({
            "file": name,
            "sha256": file_sha256(self.output / name),
            "num_sequences": header.num_sequences,
            "num_tokens": header.num_tokens,
            "num_docs": header.num_docs,
            "bytes": (self.output / name).stat().st_size,
        })

    def _checkpoint(self, unit_index: int, skip_tokens: int, stats_before_unit: dict) -> None:
        self.state.next_unit, self.state.skip_tokens, self.state.stats = unit_index, skip_tokens, stats_before_unit
        atomic_write_json(vars(self.state), self.work / STATE_NAME)
        for path in self.work.glob("unit_*.npz"):
            if _unit_index(path) < unit_index:
                path.unlink()  # fully inside finished shards


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
        self.pool = None

    def __enter__(self) -> "_UnitResults":
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        self.pool = context.Pool(self.config.workers, initializer=init_worker, initargs=(self.config.tokenizer,))
        return self

    def __exit__(self, *exc) -> None:
        self.pool.terminate()
        self.pool.join()

    def __iter__(self) -> Iterator[tuple[WorkUnit, UnitResult]]:
        window = 4 * self.config.workers
        pending: dict[int, object] = {}
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
    """What the output depends on; a rerun with the same fingerprint resumes or is recognised as done."""
    identity = {
        "format": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "seq_len": config.seq_len,
        "sources": sorted(config.sources) if config.sources else None,
        "max_tokens": config.max_tokens,
        "shard_tokens": config.shard_tokens,
        "strict": config.strict,
        "inputs": [(f.name, f.size_hint if f.dataset else os.path.getsize(f.path)) for f in files],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _existing_manifest(output: Path, fingerprint: str) -> dict | None:
    path = output / MANIFEST_NAME
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{output}: already holds shards prepared from other inputs or settings; choose another --output"
        )
    return manifest


def _load_state(work: Path, fingerprint: str) -> PackState | None:
    path = work / STATE_NAME
    if not path.exists():
        return None
    state = PackState(**json.loads(path.read_text()))
    if state.fingerprint != fingerprint:
        raise ConfigError(
            f"{work}: an interrupted run with other inputs or settings; delete {work} to start over"
        )
    return state


def _unit_index(path: Path) -> int:
    return int(path.stem.split("_")[1])


def _unit_bytes(unit: WorkUnit, file: InputFile) -> int:
    end = file.size_hint if unit.end is None else min(unit.end, file.size_hint)
    return max(0, end - unit.start)


def _progress(config: PrepareConfig, total: int, in_bytes: bool) -> tqdm:
    return tqdm(total=total, unit="B" if in_bytes else " shards", unit_scale=in_bytes, desc="tokenizing",
                disable=not config.progress, smoothing=0.1, dynamic_ncols=True)


def _shard_summary(manifest: dict, output: Path) -> str:
    return (f"{manifest['num_sequences']:,} sequences of {manifest['seq_len']} tokens in {len(manifest['shards'])} "
            f"shard(s); {manifest['tokens_dropped']:,} tokens of the final partial sequence dropped\n"
            f"manifest: {output / MANIFEST_NAME}")


def _say(config: PrepareConfig, text: str) -> None:
    if config.verbose:
        print(text, flush=True)
