"""Everything decided before the first step: the data and model identity, the checkpoint to resume, the run dir.

Rank 0 decides and broadcasts the decision (or its error) to every rank, so all ranks act on one view of the
file system and a bad config stops every rank at once with one message, never leaving the others waiting.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import yaml

from shortened.config import MISSING, ConfigError, RunConfig, TrainConfig, config_hash, dotted_value, to_dict
from shortened.data.mixture import MixtureState, SourceIndex, same_weights
from shortened.data.shards import check_shards
from shortened.data.sources import InputError, discover
from shortened.model_dir import resolve_model_dir
from shortened.tokenizer import DOCUMENT_TOKENS_FILE, TokenizerNotFound, load_tokenizer
from shortened.train.branch import set_aside_past
from shortened.train.checkpoint import (
    CONFIG_FILE,
    HF_DIR,
    Checkpoint,
    CheckpointError,
    architecture,
    check_batch_position,
    check_compatible,
    ensure_universal,
    lock_run_dir,
    resolve_resume,
)
from shortened.train.distributed import DistEnv, broadcast_object
from shortened.train.ds_config import read_base_config
from shortened.train.dynamic import check_dynamic
from shortened.train.engine import hf_config_dict
from shortened.train.state import FORMAT_VERSION, RunIdentity, TrainingState
from shortened.train.teacher import check_same_token_space, check_teacher

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """Rank 0 could not set the run up; other ranks raise this with rank 0's message and the names of its error's
    type and base types (a subclass of a bad-input error, such as ModelDirError of ConfigError, is bad input too)."""

    def __init__(self, message: str, rank0_errors: tuple[str, ...]) -> None:
        super().__init__(message)
        self.rank0_errors = rank0_errors


@dataclass(frozen=True)
class Budget:
    tokens_per_step: int
    total_steps: int  # the schedule's horizon: the token budget in steps (or max_steps without one)
    stop_step: int  # where this run stops: the budget, or max_steps if earlier


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    model_dir: Path
    tokenizer_file: Path | None
    hf_config: dict[str, Any]
    identity: RunIdentity  # what a checkpoint must share with this run
    checkpoint: Checkpoint | None
    universal: bool  # the checkpoint's world size differs: load its universal form
    start_step: int
    consumed_samples: int
    budget: Budget
    mixture: MixtureState | None = None  # data.mixture's state at the first step; None: the global order


def plan_budget(train: TrainConfig, seq_len: int, start_step: int = 0, consumed_samples: int = 0) -> Budget:
    """Where the run stops and the schedule's horizon, counting the tokens already trained.

    The token budget is in tokens, so after a change of the global batch the steps left are the tokens left
    divided by the new step size, not the budget as if every past step had had the new size.
    """
    tokens_per_step = train.global_batch_size * seq_len
    budget_steps = 0
    if train.max_tokens:
        tokens_left = max(0, train.max_tokens - consumed_samples * seq_len)
        budget_steps = start_step + math.ceil(tokens_left / tokens_per_step)
    total = budget_steps or train.max_steps
    stop = min(s for s in (budget_steps, train.max_steps) if s)
    return Budget(tokens_per_step=tokens_per_step, total_steps=total, stop_step=stop)


def on_rank0(env: DistEnv, decide: Callable[[], Any]) -> Any:
    """`decide()` on rank 0, its result (or its error) on every rank."""
    result, error = None, None
    if env.is_main:
        try:
            result = decide()
        except Exception as err:  # any failure must reach the other ranks, not strand them in the broadcast
            error = err
    failure = None if error is None else (tuple(kind.__name__ for kind in type(error).__mro__), str(error))
    outcome, rank0_failure = typing.cast(tuple[Any, tuple[tuple[str, ...], str] | None],
                                         broadcast_object((result, failure)))
    if error is not None:
        raise error
    if rank0_failure is not None:
        kinds, message = rank0_failure
        raise SetupError(f"rank 0 failed to set up the run ({kinds[0]}: {message})", kinds)
    return outcome


def data_identity(config: RunConfig, model_dir: Path) -> dict[str, Any]:
    if not config.data.path:
        raise ConfigError("data.path: must name a shard directory (prepare one with data_prep/slimpajama.py), "
                          "or raw .jsonl(.zst) input with data.format=stream")
    if config.data.format == "stream":
        return stream_identity(config, model_dir)
    manifest = check_shards(config.data.path)  # cheap: presence, sizes and headers; CRCs are checked on read
    if manifest["seq_len"] != config.data.seq_len:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len}, but the shards in {config.data.path} hold "
            f"{manifest['seq_len']}-token "
            f"sequences; set data.seq_len={manifest['seq_len']} or prepare shards with --seq-len {config.data.seq_len}"
        )
    if not manifest["num_sequences"]:
        raise ConfigError(f"data.path={config.data.path} holds no sequences ({manifest.get('docs_total', 0)} documents "
                          f"of {manifest.get('tokens_total', 0)} tokens, shorter than one {manifest['seq_len']}-token "
                          "sequence); prepare shards from a larger input")
    index = SourceIndex.from_manifest(manifest)
    return {"seq_len": manifest["seq_len"], "tokenizer_sha256": manifest["tokenizer_sha256"],
            "document_ids": (manifest.get("bos_id"), manifest.get("eos_id")),
            "data_fingerprint": manifest.get("fingerprint"), "num_sequences": manifest["num_sequences"],
            "vocab_size": manifest.get("vocab_size"), "source_sizes": index.sizes() if index else None}


def stream_identity(config: RunConfig, model_dir: Path) -> dict[str, Any]:
    """data.format=stream: the model's tokenizer encodes the raw input; the fingerprint names the input files."""
    data = config.data
    try:
        tokenizer = load_tokenizer(model_dir)
    except TokenizerNotFound:
        raise ConfigError(f"data.format=stream tokenizes with the tokenizer of model.init_from, and {model_dir} has "
                          "none; copy its tokenizer.model there") from None
    try:
        files = discover(data.path, data.split or None)
    except InputError as err:
        raise ConfigError(f"data.path (data.format=stream): {err}") from None
    listing = json.dumps([data.split, tokenizer.sha256, [(f.name, f.size_hint) for f in files]])
    return {"seq_len": data.seq_len, "tokenizer_sha256": tokenizer.sha256, "num_sequences": None,
            "data_fingerprint": "stream:" + hashlib.sha256(listing.encode()).hexdigest()[:16]}


def model_tokenizer(model_dir: Path, data: dict[str, Any]) -> Path | None:
    """The model's tokenizer file (copied into checkpoints and exports), checked against the shards' tokenizer and
    the ids they framed documents with."""
    try:
        tokenizer = load_tokenizer(model_dir)
    except TokenizerNotFound:
        log.warning("%s has no tokenizer.model / tokenizer.json: checkpoints and exports will lack a tokenizer",
                    model_dir)
        return None
    if tokenizer.sha256 != data["tokenizer_sha256"]:
        raise ConfigError(
            f"model.init_from={model_dir} has tokenizer {tokenizer.path.name} with sha256 {tokenizer.sha256[:12]}..., "
            f"but data.path shards were tokenized with sha256 {data['tokenizer_sha256'][:12]}...; prepare the shards "
            "with this model's tokenizer"
        )
    check_document_ids(model_dir, (tokenizer.bos_id, tokenizer.eos_id), data.get("document_ids"))
    return tokenizer.path


def check_document_ids(model_dir: Path, model_ids: tuple[int, int], data_ids: tuple[int | None, int | None] | None
                       ) -> None:
    """The same tokenizer file can frame documents with other ids (`document_tokens.json` names them, e.g. SmolLM2's
    <|endoftext|> instead of the instruct EOS <|im_end|>): the sha256 alone would let such shards train silently with
    separators the exported model never sees. Manifests older than the ids' record are not checked."""
    if data_ids is None or None in data_ids or data_ids == model_ids:
        return
    raise ConfigError(
        f"model.init_from={model_dir} frames documents with bos/eos ids {model_ids[0]}/{model_ids[1]} (its "
        f"tokenizer_config.json or {DOCUMENT_TOKENS_FILE}), but the data.path shards were packed with "
        f"{data_ids[0]}/{data_ids[1]}; prepare the shards again with this model's tokenizer directory, or copy the "
        f"{DOCUMENT_TOKENS_FILE} they were packed with into the model"
    )


def check_data_fits(config: RunConfig, data: dict[str, Any], hf_config: dict[str, Any]) -> None:
    """Token ids must index the model's embedding; a global batch larger than the corpus deserves a word."""
    data_vocab, model_vocab = data.get("vocab_size"), hf_config.get("vocab_size")
    if data_vocab and model_vocab and data_vocab > model_vocab:
        raise ConfigError(f"data.path={config.data.path} was tokenized with a {data_vocab}-token vocabulary, but "
                          f"model.init_from has vocab_size={model_vocab}: token ids would fall outside the "
                          "embedding; prepare the shards with the model's own tokenizer")
    sequences = data.get("num_sequences")
    if sequences and config.train.global_batch_size > sequences:
        log.warning("train.global_batch_size=%d is larger than the whole dataset (%d sequences in %s): every step "
                    "trains on %.1f copies of it", config.train.global_batch_size, sequences, config.data.path,
                    config.train.global_batch_size / sequences)


def plan_mixture(config: RunConfig, source_sizes: dict[str, int] | None, checkpoint: Checkpoint | None
                 ) -> MixtureState | None:
    """The mixture's state at the first step: fresh, the checkpoint's, or the checkpoint's per-source counts under
    changed weights (logged); None without a mixture. `source_sizes` are the shards' sources (None: not packed by
    source).

    The weights are data.mixture's, or with dynamic loading and no data.mixture the natural mixture (each source's
    share of the samples). Under dynamic loading a resume keeps the checkpoint's weights: they are the updates'.
    """
    data = config.data
    key = "data.mixture" if data.mixture is not None else "data.dynamic.every_steps"
    saved = checkpoint.state.mixture if checkpoint is not None else None
    if checkpoint is not None and data.mixed != (saved is not None):
        raise CheckpointError(mixture_switch_refusal(checkpoint, saved))
    if not data.mixed:
        return None
    if source_sizes is None:
        raise ConfigError(f"{key}: the shards in {data.path} are not packed by source (every sequence may mix "
                          "sources); prepare them with `python data_prep/slimpajama.py ... --pack-by-source`, or leave "
                          f"{key} unset")
    sources = sorted(source_sizes)
    weights = data.mixture if data.mixture is not None else natural_mixture(source_sizes)
    for name in weights:
        if name not in source_sizes:
            raise ConfigError(f"data.mixture.{name}: the shards in {data.path} have no source {name!r}; they have "
                              f"{', '.join(sources)}")
    unsampled = [source for source in sources if not weights.get(source)]
    if unsampled:
        log.info("data.mixture: not sampled (not named, or weight 0): %s", ", ".join(unsampled))
    fresh = MixtureState.start(weights, sources)
    if saved is None:
        return fresh
    assert checkpoint is not None
    if data.dynamic.enabled and not mixture_setting_changed(checkpoint, data.mixture):
        return saved  # the checkpoint's weights hold every update so far
    if same_weights(saved.weights, fresh.weights):
        return saved
    log.info("data.mixture changes on resume at step %d: weights %s -> %s; each source goes on in its own order from "
             "its consumed count, the rounding starts afresh%s", checkpoint.step, json.dumps(saved.weights),
             json.dumps(fresh.weights), "; dynamic loading's updates go on from the new weights"
             if data.dynamic.enabled else "")
    return saved.with_weights(weights, sources)


def mixture_setting_changed(checkpoint: Checkpoint, mixture: dict[str, float] | None) -> bool:
    """Whether data.mixture differs from the setting the checkpoint was written under. Under dynamic loading the
    saved weights differ from the setting by the updates; only a changed setting says the user wants new ones (it
    used to be logged as honoured, recorded in config.yaml and ignored)."""
    written = yaml.safe_load((checkpoint.path / CONFIG_FILE).read_text())
    before = dotted_value(written, "data.mixture")
    return before is not MISSING and before != mixture


def natural_mixture(source_sizes: dict[str, int]) -> dict[str, float]:
    """Each source's share of all samples: what the global order reads on average."""
    total = sum(source_sizes.values())
    return {source: size / total for source, size in sorted(source_sizes.items())}


def mixture_switch_refusal(checkpoint: Checkpoint, saved: MixtureState | None) -> str:
    """Why a checkpoint cannot resume with a mixture turned on or off, and what to do instead."""
    fresh_run = (f"or start a new run_dir from its weights ({weights_as_model(checkpoint)}); the sample orders do "
                 "not continue each other, so samples would repeat while others are skipped")
    if saved is None:
        return (f"{checkpoint.path} was trained in the global sample order, without data.mixture, and data.mixture "
                f"is set now: resume without data.mixture, {fresh_run}")
    return (f"{checkpoint.path} was trained with data.mixture={json.dumps(saved.weights)}, and data.mixture is unset "
            f"now: resume with a data.mixture (its weights may change), {fresh_run}")


def weights_as_model(checkpoint: Checkpoint) -> str:
    """How to start a run from a checkpoint's weights: its Hugging Face copy where checkpoint.save_hf wrote one,
    else an export of it."""
    model = checkpoint.path / HF_DIR
    if model.is_dir():
        return f"model.init_from={model}"
    return f"`python launch/export_hf.py --checkpoint {checkpoint.path} --out DIR`, then model.init_from=DIR"


def check_zero_stage(checkpoint: Checkpoint, deepspeed_config: str) -> None:
    stage = read_base_config(deepspeed_config).get("zero_optimization", {}).get("stage")
    saved = checkpoint.state.zero_stage
    if stage != saved:
        raise CheckpointError(f"{checkpoint.path} was written with ZeRO stage {saved}, deepspeed_config="
                              f"{deepspeed_config} has stage {stage}; resume with a stage-{saved} DeepSpeed config")


def plan_run(config: RunConfig, env: DistEnv) -> RunPlan:
    """Collective. Rank 0 locks the run dir, validates data, model and resume target, and prepares the run dir."""

    def decide() -> RunPlan:
        lock_run_dir(Path(config.run_dir))
        return decide_plan(config, env.world_size)

    return on_rank0(env, decide)


def decide_plan(config: RunConfig, world_size: int) -> RunPlan:
    """Rank 0's part of `plan_run`: every check and the resume decision, no collectives."""
    config.train.grad_accum_steps(world_size)  # a world size that does not divide the batch fails here
    run_dir = Path(config.run_dir)
    model_dir = resolve_model_dir(config.model.init_from, "model.init_from")
    data = data_identity(config, model_dir)
    hf_config = hf_config_dict(model_dir)
    identity = RunIdentity(seq_len=data["seq_len"], tokenizer_sha256=data["tokenizer_sha256"],
                           data_fingerprint=data["data_fingerprint"], architecture=architecture(hf_config))
    tokenizer_file = model_tokenizer(model_dir, data)
    check_data_fits(config, data, hf_config)
    if config.distill.enabled:
        check_teacher(config.distill, hf_config, model_dir, data["tokenizer_sha256"], data["seq_len"])
    if config.data.dynamic.enabled and config.data.dynamic.reference_model:
        check_same_token_space(Path(config.data.dynamic.reference_model), "data.dynamic.reference_model",
                               "its per-domain losses must be of the same ids as the student's", hf_config, model_dir,
                               data["tokenizer_sha256"], data["seq_len"])
    checkpoint = resolve_resume(config.resume, run_dir)
    universal, start_step, consumed = False, 0, 0
    if checkpoint is not None:
        check_compatible(checkpoint, identity, to_dict(config))
        check_batch_position(checkpoint, config.train.global_batch_size)
        check_zero_stage(checkpoint, config.deepspeed_config)
        state = checkpoint.state
        start_step, consumed = state.step, state.consumed_samples
        universal = state.world_size != world_size
        if universal:
            ensure_universal(checkpoint, config.checkpoint.on_world_size_change)
        log.info("resuming from %s (step %d, %d tokens) on %d ranks%s", checkpoint.path, start_step,
                 state.tokens, world_size, f", re-partitioned from {state.world_size}" if universal else "")
    mixture = plan_mixture(config, data.get("source_sizes"), checkpoint)
    if config.data.dynamic.enabled and mixture is not None:
        check_dynamic(config, [source for source, weight in mixture.weights.items() if weight > 0])
    run_dir.mkdir(parents=True, exist_ok=True)
    set_aside_past(run_dir, start_step)  # every check passed: the run dir now holds this branch only
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return RunPlan(run_dir=run_dir, model_dir=model_dir, tokenizer_file=tokenizer_file, hf_config=hf_config,
                   identity=identity, checkpoint=checkpoint, universal=universal, start_step=start_step,
                   consumed_samples=consumed,
                   budget=plan_budget(config.train, data["seq_len"], start_step, consumed), mixture=mixture)


def training_state(config: RunConfig, plan: RunPlan, world_size: int, step: int, consumed_samples: int,
                   zero_stage: int, mixture: MixtureState | None = None) -> TrainingState:
    """What a checkpoint at `step` records in its training_state.json (`mixture`: the mixture's state after it)."""
    return TrainingState(
        format_version=FORMAT_VERSION,
        step=step,
        consumed_samples=consumed_samples,
        tokens=consumed_samples * plan.identity.seq_len,
        world_size=world_size,
        global_batch_size=config.train.global_batch_size,
        micro_batch_size=config.train.micro_batch_size,
        zero_stage=zero_stage,
        precision=config.train.precision,
        config_hash=config_hash(config),
        identity=plan.identity,
        versions={"deepspeed": deepspeed.__version__, "torch": torch.__version__},
        mixture=mixture,
    )
