"""Zero-shot tasks through the real lm-eval harness, on an in-memory Hugging Face model, over the offline mirror.

Each task is one `lm_eval.simple_evaluate` call with lm-eval's defaults (seeds, bootstrap iterations): the
numbers are the harness's own. Requests carry exactly one `<s>` in front (the LLaMA protocol) and SentencePiece's
ids (`SentencePieceHFTokenizer`); a Llama-3 style model's `tokenizer.json` gives the `tokenizers` library's ids
with its BOS (`hf_tokenizer`). Under torch.distributed the documents are sharded by lm-eval itself
(`rank::world_size`), its collectives running on `EvalGroups.work`.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from shortened.eval.dist import EvalGroups
from shortened.eval.hf_tokenizer import hf_tokenizer
from shortened.eval.mirror import check_mirror, write_lm_eval_overrides
from shortened.eval.rows import MAX_REPORTED_ROWS, RowProblem, scorable_files
from shortened.eval.tasks import LmEvalTask

Metrics = dict[str, tuple[float, "float | None"]]  # metric -> (value, stderr)
log = logging.getLogger(__name__)


class ShardedHFLM(HFLM):
    """`HFLM` whose data-parallel hooks (rank, world size, gathers, barrier) use the evaluation groups.

    HFLM's own data parallelism needs `accelerate launch` and a model it loads itself; the trainer's model is
    already in memory on every rank, so only these hooks are swapped.
    """

    def __init__(self, groups: EvalGroups, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = groups
        self._rank = groups.rank
        self._world_size = groups.world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.groups.all_gather_tensor(tensor)

    def gather_object(self, obj, dst: int = 0):
        return self.groups.gather_object(obj, dst)

    def barrier(self) -> None:
        self.groups.barrier()


def build_lm(model: torch.nn.Module, tokenizer_file: str | Path, batch_size: int,
             groups: EvalGroups | None = None) -> HFLM:
    """lm-eval's `HFLM` around the in-memory model with `<s>` explicitly on; sharded when `groups` is given."""
    _quiet_in_memory_warnings()
    kwargs = dict(pretrained=model, tokenizer=hf_tokenizer(tokenizer_file), add_bos_token=True,
                  batch_size=batch_size)
    return HFLM(**kwargs) if groups is None else ShardedHFLM(groups, **kwargs)


@dataclass(frozen=True)
class TaskScore:
    metrics: Metrics
    samples: int  # documents scored
    skipped: list[RowProblem]  # malformed rows of the task's files, left out


def evaluate_task(lm: HFLM, spec: LmEvalTask, data_dir: str | Path, limit: int = 0) -> TaskScore | None:
    """Run one task over its valid rows: the score on rank 0, where lm-eval aggregates; None on the other ranks."""
    check_mirror(data_dir, [spec])
    with tempfile.TemporaryDirectory(prefix=f"lm_eval_{spec.name}_") as include_dir:
        files, skipped = scorable_files({split: Path(data_dir) / f for split, f in spec.splits.items()}, spec.rows,
                                        include_dir)
        if skipped and lm.rank == 0:
            _warn_skipped(spec.name, skipped)
        task_name = write_lm_eval_overrides([spec], data_dir, include_dir, {spec.name: files})[spec.name]
        manager = TaskManager(include_path=include_dir, include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[task_name], limit=limit or None, task_manager=manager, log_samples=False,
        )
    if out is None:
        return None
    return TaskScore(parse_metrics(out["results"][task_name]), int(out["n-samples"][task_name]["effective"]), skipped)


def _warn_skipped(task: str, skipped: list[RowProblem]) -> None:
    shown = "\n  ".join(str(p) for p in skipped[:MAX_REPORTED_ROWS])
    more = f"\n  ... and {len(skipped) - MAX_REPORTED_ROWS} more" if len(skipped) > MAX_REPORTED_ROWS else ""
    log.warning("task %s: %d malformed row(s) left out, not scored (fix the mirror file):\n  %s%s",
                task, len(skipped), shown, more)


def parse_metrics(result: dict) -> Metrics:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s}` as `{"acc": (v, s)}` (stderr None when 'N/A')."""
    metrics: Metrics = {}
    for key, value in result.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        stderr = result.get(f"{metric}_stderr,{filter_name}")
        metrics[metric] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return metrics


def _quiet_in_memory_warnings() -> None:
    # HFLM warns on every construction that an in-memory model skips its own accelerate setup: that is the design.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
