"""`results.jsonl`: one JSON row per checkpoint x task x metric, appended whole, read back tolerantly.

A row: run, checkpoint, step, tokens, task, metric, value, stderr, primary (the metric the paper reports for the
task), samples, seconds (the task's evaluation time), time (unix seconds when written), source (inline | watch |
evaluate), status (ok | failed; then value is null and error holds the traceback). The zero-shot mean's row also
has members ({task: metric} of the rows averaged), so a reference model's mean can be taken over the same tasks. A
validation loss's row (validation, validation/SOURCE) has sequences: "spread" (shortened.eval.validation.SEQUENCES);
one written before a limit took sequences spread over the split has none.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

RESULTS_FILE = "results.jsonl"
ZERO_SHOT_MEAN = "zero_shot_mean"

log = logging.getLogger(__name__)


def ok_row(task: str, metric: str, value: float, stderr: float | None = None, *, primary: bool,
           samples: int | None = None, seconds: float = 0.0) -> dict[str, Any]:
    return {"task": task, "metric": metric, "value": value, "stderr": stderr, "primary": primary,
            "samples": samples, "seconds": round(seconds, 3), "status": "ok"}


def mean_row(members: Sequence[dict[str, Any]], seconds: float = 0.0) -> dict[str, Any]:
    """The zero-shot mean of the member tasks' ok primary rows. Its stderr treats the tasks as independent samples,
    sqrt(sum stderr_i^2) / n, and is None unless every member has one (a partial sum would understate it)."""
    stderrs = [row["stderr"] for row in members]
    stderr = None if None in stderrs else math.sqrt(sum(se * se for se in stderrs)) / len(members)
    return {**ok_row(ZERO_SHOT_MEAN, "mean", sum(row["value"] for row in members) / len(members), stderr,
                     primary=True, samples=len(members), seconds=seconds),
            "members": {row["task"]: row["metric"] for row in members}}


def failed_row(task: str, metric: str, error: str, seconds: float = 0.0) -> dict[str, Any]:
    return {"task": task, "metric": metric, "value": None, "stderr": None, "primary": True, "samples": None,
            "seconds": round(seconds, 3), "status": "failed", "error": error}


def stamp(rows: Iterable[dict], *, run: str, step: int, tokens: int, source: str,
          checkpoint: str | None = None) -> list[dict]:
    """Put the checkpoint identity and the write time in front of each task row."""
    now = time.time()
    head = {"run": run, "checkpoint": checkpoint, "step": step, "tokens": tokens}
    return [{**head, **row, "time": now, "source": source} for row in rows]


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Append all rows in one write(2) on an O_APPEND descriptor, so a killed writer leaves all of them or none."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = "".join(json.dumps(row, allow_nan=True) + "\n" for row in rows).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if _ends_without_newline(fd):
            blob = b"\n" + blob  # a torn line from an older writer stays on its own line and is skipped on read
        written = os.write(fd, blob)
        if written != len(blob):
            raise OSError(f"{path}: short write ({written} of {len(blob)} bytes); the disk may be full")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | Path) -> list[dict]:
    """All complete rows; a line that is not JSON (a torn write) is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a line that is not JSON (an interrupted write)", path, number)
    return rows


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
