"""Dynamic batch loading in the trainer (`data.dynamic`): every `every_steps` steps, each domain's validation loss
on the per-source validation shards, the update rule of `shortened.data.dynamic`, and the new weights for the steps
that follow.

The update happens after step t's optimizer step and before step t's checkpoint, so the checkpoint's mixture state
holds the weights of step t + 1 and a resume never recomputes an update. Every rank scores its part of the
validation batches, the sums are all-reduced, and every rank applies the rule to the same numbers, so the weights
are identical everywhere and on any world size (see `domain_validation_losses`). With `reference: model`, the
reference model's losses are measured once, at the first start, and kept in the run directory's
reference_losses.json with what they were measured on; a resume reads them back.
"""
from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shortened.config import ConfigError, DistillConfig, RunConfig
from shortened.data.dynamic import updated_weights
from shortened.data.mixture import MixtureState, SourceIndex
from shortened.data.shards import PackedShards, read_manifest
from shortened.eval.results import RESULTS_FILE, append_rows, stamp
from shortened.eval.validation import SEQUENCES, domain_validation_losses, loss_row, open_validation_shards, spread
from shortened.fsutil import atomic_write_json
from shortened.rng import preserved_rng_and_mode
from shortened.train.distributed import DistEnv, all_reduce_sum, broadcast_object
from shortened.train.teacher import load_teacher

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_losses.json"
TASK_PREFIX = "validation/"  # results.jsonl: task validation/SOURCE, metric loss, source dynamic


def check_dynamic(config: RunConfig, sampled: list[str]) -> None:
    """Rank 0, before any model is built: per-source validation shards that hold every sampled domain, and a
    reference loss for each. `sampled`: the sources the starting mixture samples."""
    dynamic, path = config.data.dynamic, config.data.validation_path
    index = SourceIndex.from_manifest(read_manifest(path))
    if index is None:
        raise ConfigError(f"data.dynamic.every_steps: the validation shards in data.validation_path={path} are not "
                          "packed by source, so no domain's loss can be measured; prepare the validation split with "
                          "`python data_prep/slimpajama.py --split validation ... --pack-by-source`")
    missing = [source for source in sampled if not index.size(source)]
    if missing:
        raise ConfigError(f"data.validation_path: the validation shards in {path} have no sequence of "
                          f"{', '.join(missing)}, which the mixture samples; they have {', '.join(index.sources)}")
    if isinstance(dynamic.reference, dict):
        unnamed = [source for source in sampled if source not in dynamic.reference]
        if unnamed:
            raise ConfigError(f"data.dynamic.reference: no reference loss for {', '.join(unnamed)}; name every "
                              f"sampled source ({', '.join(sampled)}), or use reference=model")


@dataclass(frozen=True)
class DynamicUpdate:
    """One update: the losses measured after `step`, and the weights before and after."""

    step: int
    losses: dict[str, float]
    reference: dict[str, float]
    before: dict[str, float]
    after: dict[str, float]


class DynamicLoading:
    """The per-domain measurement and the update, from the validation shards; collective over all ranks."""

    def __init__(self, config: RunConfig, env: DistEnv, run_dir: Path, tokenizer_file: Path, sampled: list[str],
                 teacher: torch.nn.Module | None = None) -> None:
        self.settings, self.env, self.run_dir = config.data.dynamic, env, run_dir
        self.validation_path = config.data.validation_path
        self.shards: PackedShards = open_validation_shards(self.validation_path, tokenizer_file)
        index = SourceIndex.from_manifest(self.shards.manifest)
        assert index is not None  # check_dynamic refused unmixed shards on rank 0 before this
        self.index, self.sampled = index, sampled
        self.batch_size = config.train.micro_batch_size
        self.reference = self._reference(config, teacher)

    def due(self, step: int) -> bool:
        return step % self.settings.every_steps == 0

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Each sampled domain's validation loss, identical on every rank; the training RNG and modes untouched."""
        with preserved_rng_and_mode(model, eval_mode=True):
            return domain_validation_losses(model, self.shards, self.index, self.sampled, self.batch_size,
                                            self.settings.eval_sequences, self.env.rank, self.env.world_size,
                                            self._reduce)

    def update(self, model: torch.nn.Module, mixture: MixtureState, step: int, tokens: int) -> DynamicUpdate:
        """Measure, apply the rule, append the losses to results.jsonl (rank 0); the caller installs `after`."""
        losses = self.measure(model)
        after = updated_weights(mixture.weights, losses, self.reference, self.settings.eta, self.settings.smoothing)
        if self.env.is_main:
            rows = [loss_row(TASK_PREFIX + source, loss, samples=self._sequences(source))
                    for source, loss in losses.items()]
            append_rows(self.run_dir / RESULTS_FILE, stamp(rows, run=self.run_dir.name, step=step, tokens=tokens,
                                                           source="dynamic"))
        return DynamicUpdate(step, losses, dict(self.reference), dict(mixture.weights), after)

    def _sequences(self, source: str) -> int:
        return len(spread(self.index.size(source), self.settings.eval_sequences))

    def _reduce(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.env.device) if self.env.world_size > 1 else values

    # ------------------------------------------------------------------------------------------ the reference

    def _reference(self, config: RunConfig, teacher: torch.nn.Module | None) -> dict[str, float]:
        reference = self.settings.reference
        if isinstance(reference, dict):
            return {source: reference[source] for source in self.sampled}
        model_dir = self.settings.reference_model or config.distill.teacher
        # "sequences": which ones were scored; a file from before they were spread has the first ones' losses
        measured_on = {"model": str(Path(model_dir).resolve()),
                       "validation_path": str(Path(self.validation_path).resolve()),
                       "eval_sequences": self.settings.eval_sequences, "sequences": SEQUENCES}
        path = self.run_dir / REFERENCE_FILE
        kept = kept_reference(path, measured_on, self.sampled) if self.env.is_main else None
        if self.env.world_size > 1:
            kept = broadcast_object(kept)  # type: ignore[assignment]  # rank 0 read the file for every rank
        if kept is not None:
            if self.env.is_main:
                log.info("data.dynamic: reference losses of %s from %s: %s", model_dir, path, json.dumps(kept))
            return dict(kept)
        if teacher is not None and Path(model_dir).resolve() == Path(config.distill.teacher).resolve():
            losses = self.measure(teacher)  # the teacher is in memory already
        else:
            model = self._load(model_dir, config)
            losses = self.measure(model)
            del model
            gc.collect()
        if self.env.is_main:
            atomic_write_json({**measured_on, "losses": losses}, path)
            log.info("data.dynamic: reference losses of %s on %s: %s (kept in %s)", model_dir, self.validation_path,
                     json.dumps(losses), path)
        return losses

    def _load(self, model_dir: str, config: RunConfig) -> torch.nn.Module:
        return load_teacher(DistillConfig(teacher=model_dir), config.train.precision, self.env.device,
                            config.model.attn_implementation)


def kept_reference(path: Path, measured_on: dict[str, Any], sampled: list[str]) -> dict[str, float] | None:
    """The reference losses kept in `path` (a run directory's reference_losses.json), if they were measured on the
    same model, shards, count and choice of sequences and name every sampled domain; else None (measured afresh, and
    said so when a file was there)."""
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
        measured = {key: kept.get(key) for key in measured_on}
        losses = {source: float(loss) for source, loss in kept["losses"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: unreadable; measuring the reference losses again", path)
        return None
    missing = [source for source in sampled if source not in losses]
    if measured != measured_on or missing:
        log.info("%s was measured on %s%s; measuring the reference losses again on %s", path, measured,
                 f" without {', '.join(missing)}" if missing else "", measured_on)
        return None
    return {source: losses[source] for source in sampled}


def start_dynamic(config: RunConfig, env: DistEnv, run_dir: Path, tokenizer_file: Path | None,
                  mixture: MixtureState | None, teacher: torch.nn.Module | None) -> DynamicLoading | None:
    """The run's dynamic loading, or None when data.dynamic is off."""
    if not config.data.dynamic.enabled:
        return None
    if mixture is None or tokenizer_file is None:  # plan_mixture made a mixture; the plan found the tokenizer
        raise ConfigError("data.dynamic: needs shards packed by source and the model's tokenizer")
    sampled = [source for source, weight in mixture.weights.items() if weight > 0]
    return DynamicLoading(config, env, run_dir, tokenizer_file, sampled, teacher)


def describe(update: DynamicUpdate) -> str:
    """The log line of an update."""
    parts = [f"{source} {update.losses[source]:.4f} (ref {update.reference[source]:.4f}) "
             f"{update.before[source]:.4f}->{update.after[source]:.4f}" for source in update.losses]
    return f"data.dynamic at step {update.step}: loss, reference and weight by source: " + "; ".join(parts)
