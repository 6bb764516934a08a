"""The trainer's inline evaluation hook.

    evaluator = InlineEvaluator(config.eval, run_dir, tokenizer_file,      # on every rank, same point
                                validation_path=config.data.validation_path)
    ...
    if config.eval.is_inline_point(step, tokens, tokens_per_step):
        evaluator(engine.module, step, tokens)                            # on every rank

Every rank calls it (the work is sharded over the data-parallel ranks when torch.distributed is initialized);
rank 0 appends the rows to `run_dir/results.jsonl`. It never raises for a failing task. It leaves the model in
eval mode: the trainer calls it through its hook layer, which restores every RNG state and module mode, so the
training loss trace is unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from shortened.config import EvalConfig
from shortened.eval.dist import EvalGroups
from shortened.eval.results import RESULTS_FILE, append_rows, failed_row, stamp
from shortened.eval.suite import EvalSuite

log = logging.getLogger(__name__)


class InlineEvaluator:
    def __init__(self, config: EvalConfig, run_dir: str | Path, tokenizer_file: str | Path,
                 validation_path: str | Path = "", run_name: str | None = None) -> None:
        """Collective when torch.distributed is initialized: build it on every rank at the same point.

        `validation_path`: the run's held-out token shards (data.validation_path), scored as one more task.
        Raises ConfigError for an unknown task or a bad task table, so a typo stops the job at start-up.
        """
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_name = run_name or self.run_dir.name
        self.groups = EvalGroups.from_default_group(config.collective_timeout_s)
        self.suite = EvalSuite(config, tokenizer_file, self.groups, validation_path)

    @property
    def results_path(self) -> Path:
        return self.run_dir / RESULTS_FILE

    def __call__(self, model: torch.nn.Module, step: int, tokens: int,
                 checkpoint: str | None = None) -> list[dict[str, Any]]:
        """Evaluate `model` (the DeepSpeed engine's `.module`); the stamped rows, identical on every rank."""
        rank = self.groups.rank if self.groups else 0
        start = time.perf_counter()
        with _library_output_to(self.run_dir / "logs" / f"eval_rank{rank}.log"):
            try:
                rows = self.suite.run(model)
            except Exception:  # the suite records task failures itself; this is the last line of defence
                error = traceback.format_exc()
                log.error("inline evaluation at step %d failed:\n%s", step, error)
                rows = [failed_row("evaluation", "-", error)]
        rows = stamp(rows, run=self.run_name, step=step, tokens=tokens, source="inline", checkpoint=checkpoint)
        if rank == 0:
            log.info("evaluation at step %d (%s tokens, %.1f s): %s", step, f"{tokens:,}",
                     time.perf_counter() - start, headline(rows))
            try:
                append_rows(self.results_path, rows)
            except OSError as err:  # a full disk must not end a training run
                log.error("could not append evaluation results to %s: %s", self.results_path, err)
        return rows


def headline(rows: list[dict[str, Any]]) -> str:
    """One console line for an evaluation: each task's reported metric, and the tasks that failed."""
    shown = [f"{r['task']} {r['metric']} {r['value']:.4g}" for r in rows if r["status"] == "ok" and r["primary"]]
    failed = sorted({r["task"] for r in rows if r["status"] != "ok"})
    skipped = [f"{r['task']} skipped {r['skipped_rows']} malformed row(s)" for r in rows
               if r["status"] == "ok" and r["primary"] and r.get("skipped_rows")]
    notes = skipped + ([f"FAILED: {', '.join(failed)}"] if failed else [])
    return ", ".join(shown + ([f"{'; '.join(notes)} (see results.jsonl)"] if notes else [])) or "no rows"


@contextlib.contextmanager
def _library_output_to(path: Path):
    """lm-eval, datasets and our scorers draw a progress bar per task on every rank; inside a training job they
    would shred the trainer's own progress line, so what they write to stderr goes to a per-rank file instead
    (kept for debugging, not discarded). Logging is unaffected: its handlers hold the real stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
        yield
