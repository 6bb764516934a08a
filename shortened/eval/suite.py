"""Evaluate one model on the configured tasks: rows for results.jsonl, a failed task recorded instead of raised.

When `groups` is given every rank calls `run` and each task ends with one `agree` exchange that every rank
reaches whether its share succeeded or not: all ranks return the same rows and stay in lockstep.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shortened.config import EvalConfig
from shortened.eval.dist import EvalGroups, PeerFailure
from shortened.eval.perplexity import PerplexityResult, task_windows
from shortened.eval.results import ZERO_SHOT_MEAN, failed_row, mean_row, ok_row
from shortened.eval.scoring import nll_sum
from shortened.eval.tasks import LmEvalTask, PerplexityTask, TaskSpec, configured_tasks
from shortened.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class ModelFileError(FileNotFoundError):
    """The model to evaluate, or a file of it evaluation needs, is not there; the message names it and the fix."""


class EvalSuite:
    def __init__(self, config: EvalConfig, tokenizer_file: str | Path, groups: EvalGroups | None = None,
                 validation_path: str | Path = "") -> None:
        """Bad or repeated task names, nothing to evaluate, or a bad task table raise ConfigError here, at start-up,
        not at the first evaluation.

        `validation_path`: held-out token shards (data.validation_path); their loss is one more task when given.
        """
        self.config = config
        self.validation_path = str(validation_path or "")
        self.tokenizer_file = _tokenizer_file(tokenizer_file)
        self.specs: list[TaskSpec] = configured_tasks(config, self.validation_path)
        self.groups = groups
        self._windows: dict[str, np.ndarray] = {}  # perplexity windows, tokenised once per suite
        self._lm = None

    @property
    def rank(self) -> int:
        return self.groups.rank if self.groups else 0

    def run(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Task rows (unstamped), with the model in eval mode (no dropout); it is left in eval mode.

        Inside training, the trainer's hook layer (`shortened.train.hooks.call_hooks`) restores every RNG state
        and module mode around the evaluation; standalone callers (evaluate.py, the watcher) have nothing to
        restore.
        """
        rows: list[dict[str, Any]] = []
        model.eval()
        try:
            for spec in self.specs:
                rows += self._run_task(model, spec)
            if self.validation_path:
                rows += self._validation_rows(model)
        finally:
            self._lm = None  # the harness wrapper holds the model; never keep it past this evaluation
        return rows + self._mean_rows(rows)

    # ------------------------------------------------------------------------------------------ tasks

    def _harness(self, model: torch.nn.Module):
        """lm-eval's wrapper of `model`, built at the first zero-shot task of a run (its failure fails that task)."""
        if self._lm is None:
            from shortened.eval.zero_shot import build_lm

            self._lm = build_lm(model, self.tokenizer_file, self.config.batch_size, self.groups)
        return self._lm

    def _run_task(self, model: torch.nn.Module, spec: TaskSpec) -> list[dict[str, Any]]:
        start = time.perf_counter()
        if isinstance(spec, LmEvalTask):
            from shortened.eval.zero_shot import evaluate_task

            parts, failed = self._attempt(spec.name, spec.metric, lambda: evaluate_task(
                self._harness(model), spec, self.config.data_dir, self.config.limit))
            if failed:
                return failed
            return self._zero_shot_rows(spec, parts[0], time.perf_counter() - start)
        parts, failed = self._attempt(spec.name, spec.metric, lambda: self._perplexity_sums(model, spec))
        if failed:
            return failed
        result = PerplexityResult.from_sums(sum(p[0] for p in parts), sum(p[1] for p in parts))
        return [ok_row(spec.name, spec.metric, result.ppl, primary=True, samples=result.tokens,
                       seconds=time.perf_counter() - start),
                ok_row(spec.name, "nll", result.nll, primary=False, samples=result.tokens,
                       seconds=time.perf_counter() - start)]

    def _attempt(self, task: str, metric: str, work) -> tuple[list[Any], list[dict[str, Any]]]:
        """(every rank's result of `work`, []), or ([], a failed row) if any rank failed, logged with its traceback."""
        start = time.perf_counter()
        local, error = None, None
        try:
            local = work()
        except PeerFailure as err:
            error = (False, str(err))  # a consequence: another rank's error is the one to report
        except Exception:
            error = (True, f"rank {self.rank}: {traceback.format_exc()}")
        parts = self.groups.agree((local, error)) if self.groups else [(local, error)]
        errors = sorted((e for _, e in parts if e), key=lambda e: not e[0])
        if not errors:
            return [p for p, _ in parts], []
        if self.groups:
            self.groups.renew_work_group()
        message = "\n".join(text for _, text in errors)
        log.error("evaluation task %s failed:\n%s", task, message)
        return [], [failed_row(task, metric, message, time.perf_counter() - start)]

    def _zero_shot_rows(self, spec: LmEvalTask, score, seconds: float) -> list[dict[str, Any]]:
        from shortened.eval.rows import MAX_REPORTED_ROWS

        metrics = score.metrics
        if spec.metric not in metrics:
            error = (f"task {spec.name}: lm-eval reported {', '.join(metrics) or 'no metric'}, but the task table "
                     f"asks for {spec.metric!r}; fix tasks.{spec.name}.metric")
            log.error(error)
            return [failed_row(spec.name, spec.metric, error, seconds)]
        # Malformed rows were not scored; the row says how many and names the first, so the number is not
        # mistaken for one over the whole file.
        skipped: dict[str, Any] = {"skipped_rows": len(score.skipped)}
        if score.skipped:
            skipped["skipped"] = [str(p) for p in score.skipped[:MAX_REPORTED_ROWS]]
        return [{**ok_row(spec.name, metric, value, stderr, primary=metric == spec.metric, samples=score.samples,
                          seconds=seconds), **skipped} for metric, (value, stderr) in metrics.items()]

    def _perplexity_sums(self, model: torch.nn.Module, spec: PerplexityTask) -> tuple[float, int]:
        if spec.name not in self._windows:
            from shortened.eval.mirror import check_mirror

            check_mirror(self.config.data_dir, [spec])
            tokenizer = load_tokenizer(self.tokenizer_file)
            self._windows[spec.name] = task_windows(spec, self.config.data_dir, tokenizer, self.config.ppl_seq_len)
        windows = self._windows[spec.name]
        windows = windows[: self.config.limit] if self.config.limit else windows
        if len(windows) == 0:
            raise ValueError(f"{spec.file}: the text is shorter than one {self.config.ppl_seq_len}-token window")
        world = self.groups.world_size if self.groups else 1
        return nll_sum(model, windows, self.config.batch_size, self.rank, world, desc=spec.name)

    def _validation_rows(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        from shortened.eval import validation

        start = time.perf_counter()
        world = self.groups.world_size if self.groups else 1

        def work() -> tuple[float, int]:
            shards = validation.open_validation_shards(self.validation_path, self.tokenizer_file)
            return validation.validation_nll(model, shards, self.config.batch_size, self.rank, world, self.config.limit)

        parts, failed = self._attempt(validation.TASK, validation.METRIC, work)
        if failed:
            return failed
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return [validation.loss_row(validation.TASK, total / count, samples=count,
                                    seconds=time.perf_counter() - start)]

    def _mean_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The plain mean of the reported metric of every zero-shot task marked `in_mean` (failed if one failed)."""
        members = [s for s in self.specs if isinstance(s, LmEvalTask) and s.in_mean]
        if not members:
            return []
        reported = {r["task"]: r for r in rows if r["status"] == "ok" and r["primary"]}
        missing = [s.name for s in members if s.name not in reported]
        seconds = sum(r["seconds"] for r in rows if r["primary"] and r["task"] in {s.name for s in members})
        if missing:
            return [failed_row(ZERO_SHOT_MEAN, "mean", f"no result for {', '.join(missing)}", seconds)]
        return [mean_row([reported[s.name] for s in members], seconds)]


def _tokenizer_file(path: str | Path) -> Path:
    """The model's reference tokenizer: SentencePiece's tokenizer.model (LLaMA/Vicuna), else a tokenizer.json
    (Llama-3 style), as `shortened.tokenizer.load_tokenizer` chooses."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return path / name
    raise ModelFileError(f"{path}: no tokenizer.model or tokenizer.json; evaluation scores a model with its own "
                         "tokenizer's ids, so pass the tokenizer file or its directory")
