"""Worker side of data preparation: read one work unit, tokenize its documents, write the result atomically.

A unit's result file is a pure function of (input file, byte range, tokenizer, source filter): it does not
depend on the worker count, so the packed output is byte-identical for any `--workers`, and a result that
exists under its final name was written whole, so a restarted run keeps it.
"""
from __future__ import annotations

import io
import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shortened.data.sources import BadLine, InputFile, UnitReadLog, WorkUnit, read_unit
from shortened.fsutil import atomic_write_bytes
from shortened.tokenizer import Tokenizer, load_tokenizer

_tokenizer: Tokenizer | None = None


@dataclass(frozen=True)
class UnitTask:
    file: InputFile
    unit: WorkUnit
    result_path: str
    sources: frozenset[str] | None
    strict: bool


@dataclass
class UnitResult:
    tokens: np.ndarray  # the unit's documents, each framed as <s> ids </s>
    doc_lens: np.ndarray  # tokens per document, <s> and </s> included
    doc_bytes: np.ndarray  # UTF-8 bytes of each document's text
    doc_source: np.ndarray  # index into source_names
    source_names: list[str]
    bad: list[BadLine]
    filtered: dict[str, int]


def init_worker(tokenizer_path: str) -> None:
    global _tokenizer
    _tokenizer = load_tokenizer(tokenizer_path)


def tokenize_unit(task: UnitTask) -> str:
    """Tokenize one unit into `task.result_path`; returns that path."""
    assert _tokenizer is not None, "init_worker was not called in this process"
    _save(task.result_path, tokenize_documents(_tokenizer, task.file, task.unit, task.sources, task.strict))
    return task.result_path


def tokenize_documents(tok: Tokenizer, file: InputFile, unit: WorkUnit, sources: frozenset[str] | None = None,
                       strict: bool = False) -> UnitResult:
    """The documents of one unit framed as `<s> ids </s>`, with per-document sizes and sources."""
    log = UnitReadLog()
    # array('H') grows in C; converting per-document Python lists to numpy would cost ~5% of throughput.
    tokens = array("H" if tok.vocab_size <= 1 << 16 else "I")
    doc_lens, doc_bytes, doc_source = array("q"), array("q"), array("H")
    source_index: dict[str, int] = {}
    for doc in read_unit(file, unit, log, sources, strict):
        ids = tok.encode(doc.text)
        tokens.append(tok.bos_id)
        tokens.extend(ids)
        tokens.append(tok.eos_id)
        doc_lens.append(len(ids) + 2)
        doc_bytes.append(len(doc.text.encode("utf-8")))
        doc_source.append(source_index.setdefault(doc.source, len(source_index)))
    return UnitResult(
        tokens=np.frombuffer(tokens, dtype=np.uint16 if tokens.typecode == "H" else np.uint32),
        doc_lens=np.frombuffer(doc_lens, dtype=np.int64),
        doc_bytes=np.frombuffer(doc_bytes, dtype=np.int64),
        doc_source=np.frombuffer(doc_source, dtype=np.uint16),
        source_names=list(source_index),
        bad=log.bad,
        filtered=log.filtered,
    )


def load_unit_result(path: str | Path) -> UnitResult:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        return UnitResult(
            tokens=data["tokens"],
            doc_lens=data["doc_lens"],
            doc_bytes=data["doc_bytes"],
            doc_source=data["doc_source"],
            source_names=meta["source_names"],
            bad=[BadLine(**b) for b in meta["bad"]],
            filtered=meta["filtered"],
        )


def _save(path: str, result: UnitResult) -> None:
    meta = {"source_names": result.source_names, "bad": [vars(b) for b in result.bad], "filtered": result.filtered}
    blob = io.BytesIO()
    np.savez(blob, tokens=result.tokens, doc_lens=result.doc_lens, doc_bytes=result.doc_bytes,
             doc_source=result.doc_source, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(blob.getvalue(), Path(path))
