"""The training loop: micro-batches in the global data order, one optimizer step per global batch, checkpoints
every N steps, at the end and on preemption, and one log line per step.

`train(config, hooks)` is the whole job on one rank; every rank runs it (see launch/cpt.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from transformers import PreTrainedModel
from transformers.utils.generic import is_flash_attention_requested

from shortened.config import ConfigError, RunConfig, TrainConfig, to_dict
from shortened.data.loader import build_train_loader
from shortened.data.mixture import MixtureState, SourceIndex, advance, epochs_begun
from shortened.data.packing import document_bounds
from shortened.data.sampler import global_order_indices
from shortened.data.shards import read_manifest
from shortened.data.streaming import StreamSpec, build_streaming_loader
from shortened.fsutil import atomic_write_json
from shortened.modeling import train_flops_per_token
from shortened.rng import load_rng_state, restore_rng_state, seed_everything
from shortened.train import checkpoint as ckpt
from shortened.train.build_locks import BuildLockWatcher
from shortened.train.distributed import (
    DistEnv,
    all_gather_ints,
    all_reduce_sum,
    apply_timeout_to_all_groups,
    setup_distributed,
    shutdown,
)
from shortened.train.ds_config import build_deepspeed_config
from shortened.train.dynamic import DynamicLoading, describe, start_dynamic
from shortened.train.engine import apply_optim_settings, build_engine, cpu_has_bf16_kernels, load_model
from shortened.train.failpoints import failpoint
from shortened.train.hooks import StepContext, TrainerHook, call_hooks, missed_at_resume
from shortened.train.kernels import apply_kernels, check_kernels, set_fp32_matmul_precision
from shortened.train.metrics import PhaseTimer, TrainLogger, memory_gb, peak_flops
from shortened.train.objective import DistillationObjective, NextTokenObjective, Objective
from shortened.train.plan import RunPlan, plan_run, training_state
from shortened.train.signals import StopRequest, ignore_stop_signals
from shortened.train.teacher import load_teacher, teacher_flops_per_token

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient) was NaN/inf and train.nan_policy says stop."""


class TokenOutOfRange(ValueError):
    """A batch holds a token id the model's embedding does not have; the message names the sample."""


@dataclass(frozen=True)
class TrainResult:
    step: int
    tokens: int
    reason: str  # "done" (budget or max_steps reached) or the name of the stop signal
    checkpoint: Path | None


def train(config: RunConfig, hooks: Sequence[TrainerHook] = ()) -> TrainResult:
    """Run (or resume) the job described by `config` on this rank; collective over all ranks."""
    stop = StopRequest().install()  # first: a preemption during start-up still gets its checkpoint
    # ops are compiled or loaded under a lock file in init_distributed and deepspeed.initialize (in _build)
    build_locks = BuildLockWatcher.start_on_local_rank_0()
    env = setup_distributed(config.train.dist_timeout_s)
    try:
        plan = plan_run(config, env)
        start_tokens = plan.consumed_samples * plan.identity.seq_len
        if plan.start_step >= plan.budget.stop_step and not missed_at_resume(
                hooks, plan.start_step, start_tokens, plan.budget.tokens_per_step, plan.run_dir, env.rank):
            log.info("step %d already reaches the stop at step %d: nothing to train", plan.start_step,
                     plan.budget.stop_step)
            return TrainResult(plan.start_step, start_tokens, "done", plan.checkpoint.path if plan.checkpoint else None)
        seed_everything(config.train.seed + env.rank)
        engine = _build(config, env, plan)
        if build_locks is not None:
            build_locks.stop()
        apply_timeout_to_all_groups(config.train.dist_timeout_s)
        if plan.checkpoint is not None:
            _resume(engine, config, env, plan, plan.checkpoint)
        objective, teacher, teacher_flops = _objective(engine, config, env)
        # collective: with reference=model the reference's losses are measured here, once per run
        dynamic = start_dynamic(config, env, plan.run_dir, plan.tokenizer_file, plan.mixture, teacher)
        return _loop(engine, config, env, plan, hooks, stop, objective, teacher_flops, dynamic)
    finally:
        if build_locks is not None:
            build_locks.stop()
        shutdown()


def _build(config: RunConfig, env: DistEnv, plan: RunPlan):
    if env.is_main and env.device.type == "cpu" and config.train.precision == "bf16" and not cpu_has_bf16_kernels():
        log.warning("train.precision=bf16 on a CPU without bf16 kernels (no AVX-512): bf16 is emulated and each step "
                    "runs several times slower than with train.precision=fp32")
    check_kernels(config.model, config.train.compile, env.device)
    set_fp32_matmul_precision(env.device, config.train.tf32)
    model = load_model(config.model, plan.model_dir, config.train.precision, config.data.seq_len)
    apply_kernels(model, config.model, config.train.compile)
    ds_config = build_deepspeed_config(config, env.world_size, on_cuda=env.device.type == "cuda",
                                       load_universal=plan.universal)
    if env.is_main:
        atomic_write_json(ds_config, plan.run_dir / "deepspeed_config.json")
    return build_engine(model, ds_config, config.optim, plan.budget.total_steps)


def _objective(engine, config: RunConfig, env: DistEnv) -> tuple[Objective, torch.nn.Module | None, float]:
    """The micro-batch loss, the teacher (None without distillation), and the teacher's forward FLOPs per token
    that MFU counts beside the student's."""
    if not config.distill.enabled:
        return NextTokenObjective(engine, config.train.loss_chunk_size), None, 0.0
    teacher = load_teacher(config.distill, config.train.precision, env.device, config.model.attn_implementation)
    if env.is_main:
        log.info("distilling from %s (%.1fM parameters, frozen, outside the optimizer): %s", config.distill.teacher,
                 teacher.num_parameters() / 1e6, json.dumps(to_dict(config.distill)))
    return (DistillationObjective(engine, teacher, config.distill), teacher,
            teacher_flops_per_token(teacher, config.data.seq_len))


def _resume(engine, config: RunConfig, env: DistEnv, plan: RunPlan, checkpoint: ckpt.Checkpoint) -> None:
    load_dir, tag = ckpt.engine_load_location(checkpoint, plan.universal)
    try:
        loaded, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except (OSError, RuntimeError, AssertionError, KeyError, ValueError, EOFError) as err:
        # Its files passed the size check against the marker, so the content itself is damaged.
        raise ckpt.CheckpointError(f"DeepSpeed could not load {load_dir}/{tag} ({type(err).__name__}: {err}); "
                                   "resume=PATH from an older checkpoint of the run") from None
    if loaded is None:
        raise ckpt.CheckpointError(f"DeepSpeed could not load {load_dir}/{tag}; resume=PATH from an older checkpoint")
    applied = apply_optim_settings(engine, config.optim, config.train.grad_clip)  # the config decides, not the file
    if env.is_main:
        log.info("optimizer after resume: %s", json.dumps(applied))
    rng_file = checkpoint.path / "rng" / f"rank_{env.rank:05d}.pt"
    if rng_file.is_file():
        restore_rng_state(load_rng_state(rng_file))
    else:  # a rank the saving run did not have (more ranks now): a fresh, distinct, reproducible stream
        log.warning("%s: no RNG state for rank %d; seeding it from train.seed, rank and step", checkpoint.path,
                    env.rank)
        seed_everything(config.train.seed + env.rank + 1_000_003 * plan.start_step)


@dataclass
class LoopState:
    """What the loop carries from one step to the next (a checkpoint records its step and consumed samples)."""

    step: int  # optimizer steps done
    consumed_samples: int
    last_checkpoint: Path | None  # the newest complete checkpoint, named when training stops on a bad loss
    skips_in_a_row: int = 0  # non-finite steps just before this one, against train.max_consecutive_skips
    mixture: MixtureState | None = None  # data.mixture's state after `step`: the loop's own copy (see _domain_step)


@dataclass(frozen=True)
class StepMeasurement:
    """What one optimizer step measured (the loss reduced over all ranks)."""

    loss: float  # the optimized total, mean over ranks and micro-batches
    ce_loss: float  # the student's next-token loss (equal to `loss` without a teacher)
    kd_loss: float | None  # the distillation term, None without a teacher
    lr: float  # the rate the step's update used
    applied: bool  # False when the update was skipped (non-finite gradients)
    grad_norm: float | None  # None when DeepSpeed has none or it is not finite
    step_time: float
    phases: dict[str, float]


@dataclass(frozen=True)
class LoopContext:
    """What stays fixed while the loop runs, and the log lines and hook contexts are computed from."""

    env: DistEnv
    model: torch.nn.Module  # the engine's module, given to hooks
    seq_len: int
    step_tokens: int
    flops_per_token: float
    peak: float | None  # the device's peak FLOP/s, None when unknown (no MFU then)
    run_dir: Path
    tokenizer_file: Path | None

    def tokens(self, state: LoopState) -> int:
        return state.consumed_samples * self.seq_len

    def hook_context(self, state: LoopState, loss: float) -> StepContext:
        return StepContext(step=state.step, tokens=self.tokens(state), step_tokens=self.step_tokens,
                           consumed_samples=state.consumed_samples, loss=loss, model=self.model, run_dir=self.run_dir,
                           rank=self.env.rank, world_size=self.env.world_size, tokenizer_file=self.tokenizer_file)


def _loop(engine, config: RunConfig, env: DistEnv, plan: RunPlan, hooks: Sequence[TrainerHook],
          stop: StopRequest, objective: Objective, teacher_flops: float, dynamic: DynamicLoading | None
          ) -> TrainResult:
    train_cfg, budget = config.train, plan.budget
    state = LoopState(step=plan.start_step, consumed_samples=plan.consumed_samples,
                      last_checkpoint=plan.checkpoint.path if plan.checkpoint else None, mixture=plan.mixture)
    domains = _source_index(config)
    seq_len = plan.identity.seq_len
    run = LoopContext(env=env, model=engine.module, seq_len=seq_len, step_tokens=budget.tokens_per_step,
                      flops_per_token=train_flops_per_token(engine.module.config, seq_len) + teacher_flops,
                      peak=peak_flops(env.device, config.log.peak_tflops), run_dir=plan.run_dir,
                      tokenizer_file=plan.tokenizer_file)
    varlen = document_mask_inputs(config, engine.module)
    batches = iter(_train_loader(config, env, plan, state.mixture))
    grad_accum = engine.gradient_accumulation_steps()
    logger = None
    if env.is_main:
        logger = TrainLogger(plan.run_dir, start_step=state.step, start_tokens=run.tokens(state),
                             stop_tokens=budget.stop_step * budget.tokens_per_step, every_steps=config.log.every_steps,
                             tensorboard=config.log.tensorboard)
    config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False)
    timer = PhaseTimer(env.device, config.log.sync_timers)
    try:
        call_hooks(hooks, "before_training", run.hook_context(state, math.nan))
        if logger is not None:
            logger.start_clock()
        while state.step < budget.stop_step:
            lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on inside step()
            started = time.perf_counter()
            local, sample_ids = _step(engine, batches, grad_accum, timer, env.device, objective,
                                      config.log.sample_ids, varlen)
            # One collective per step carries the losses and whether any rank was asked to stop.
            *sums, stop_votes = all_reduce_sum([*local, float(bool(stop))], env.device)
            step_time = time.perf_counter() - started
            domain_fields = _domain_step(state, domains, config, logger)
            state.step += 1
            state.consumed_samples += train_cfg.global_batch_size
            total, ce, kd = (value / (env.world_size * grad_accum) for value in sums)
            measured = StepMeasurement(loss=total, ce_loss=ce, kd_loss=kd if config.distill.enabled else None,
                                       lr=lr, applied=engine.was_step_applied(), grad_norm=_grad_norm(engine),
                                       step_time=step_time, phases=timer.pop())
            record = {**_record(state, measured, run), **domain_fields}
            if dynamic is not None and dynamic.due(state.step):
                record.update(_dynamic_update(dynamic, state, run, logger))
                # the loader's prefetched batches follow the old weights: start it again from the new state,
                # as a resume from this step's checkpoint would
                batches = iter(_train_loader(config, env, plan, state.mixture))
            if config.log.sample_ids:
                record["sample_ids"] = all_gather_ints(sample_ids, env.device)
            try:
                state.skips_in_a_row = _check_finite(measured, state, train_cfg)
            except NonFiniteLoss:
                if logger is not None:
                    logger.log(record)
                raise
            stopping = stop_votes > 0
            saved = None
            if stopping or state.step % config.checkpoint.every_steps == 0 or state.step == budget.stop_step:
                save_started = time.perf_counter()
                saved = ckpt.save(engine, env, plan.run_dir,
                                  training_state(config, plan, env.world_size, state.step, state.consumed_samples,
                                                 engine.zero_optimization_stage(), state.mixture),
                                  config_yaml=config_yaml, hf_config=plan.hf_config,
                                  tokenizer_file=plan.tokenizer_file, save_hf=config.checkpoint.save_hf,
                                  keep_last=config.checkpoint.keep_last)
                record["checkpoint_s"] = time.perf_counter() - save_started
                state.last_checkpoint = saved
            if logger is not None:
                logger.log(record)
            ctx = run.hook_context(state, measured.loss)
            if saved is not None:
                call_hooks(hooks, "after_checkpoint", dataclasses.replace(ctx, checkpoint=saved))
            call_hooks(hooks, "after_step", ctx)
            failpoint("loop.after_step", rank=env.rank, step=state.step)
            if stopping:
                reason = stop.signal_name or "signal on another rank"
                _say(logger, f"stopped by {reason} at step {state.step}: checkpoint {saved} is complete; "
                             "run the same command again to resume")
                return TrainResult(state.step, run.tokens(state), reason, saved)
        _say(logger, f"done: step {state.step}, {run.tokens(state):,} tokens, checkpoint {state.last_checkpoint}")
        return TrainResult(state.step, run.tokens(state), "done", state.last_checkpoint)
    finally:
        if logger is not None:
            logger.close()


def _source_index(config: RunConfig) -> SourceIndex | None:
    """The shards' samples by source, when they are packed by source (the steps' domain_samples); else None."""
    if config.data.format != "shards":
        return None
    return SourceIndex.from_manifest(read_manifest(config.data.path))


def _domain_step(state: LoopState, domains: SourceIndex | None, config: RunConfig,
                 logger: TrainLogger | None) -> dict[str, Any]:
    """The coming step's log fields by source: `domain_samples` (and `domain_weights` under a mixture); advances
    the loop's own copy of the mixture state by the step.

    The counts are computed by the sampler's own function from the loop's state, not read from the sampler, which
    runs ahead of the loop by the DataLoader's prefetched batches. Without a mixture, on shards packed by source,
    rank 0 maps the step's global sample ids (the global order's, recomputed) to their sources.
    """
    batch = config.train.global_batch_size
    if state.mixture is None:
        if domains is None or logger is None:
            return {}
        ids = global_order_indices(domains.num_samples, config.data.seed, state.consumed_samples, batch)
        return {"domain_samples": domains.count_by_source(ids)}
    counts, after = advance(state.mixture, batch)
    if domains is not None:
        for source, epoch in epochs_begun(domains, state.mixture, after).items():
            _say(logger, f"data.mixture: {source} has been read through; its epoch {epoch} begins at step "
                         f"{state.step + 1}")
    weights, state.mixture = state.mixture.weights, after
    return {"domain_samples": counts, "domain_weights": weights}


def _dynamic_update(dynamic: DynamicLoading, state: LoopState, run: LoopContext, logger: TrainLogger | None
                    ) -> dict[str, Any]:
    """Dynamic loading's update after `state.step`: new weights in the loop's mixture state, and the step's log
    fields (the measured losses, which with this row's domain_weights and the reference give the next row's)."""
    assert state.mixture is not None  # plan_mixture gives dynamic loading a mixture
    started = time.perf_counter()
    update = dynamic.update(run.model, state.mixture, state.step, run.tokens(state))
    state.mixture = state.mixture.with_weights(update.after, list(state.mixture.weights))
    _say(logger, describe(update))
    return {"dynamic_losses": update.losses, "dynamic_s": time.perf_counter() - started}


def _train_loader(config: RunConfig, env: DistEnv, plan: RunPlan, mixture: MixtureState | None) -> DataLoader:
    """This rank's micro-batches from `plan.consumed_samples` (or from `mixture`'s state) on: shards in the global
    order or by mixture, or the raw stream."""
    layout: dict[str, Any] = dict(global_batch_size=config.train.global_batch_size,
                                  micro_batch_size=config.train.micro_batch_size,
                  dp_rank=env.rank, dp_world_size=env.world_size, consumed_samples=plan.consumed_samples,
                  num_workers=config.data.num_workers, pin_memory=env.device.type == "cuda",
                  document_mask=config.data.document_mask, worker_init_fn=ignore_stop_signals)
    if config.data.format == "stream":
        spec = StreamSpec(config.data.path, str(plan.tokenizer_file), config.data.seq_len,
                          split=config.data.split or None)
        return build_streaming_loader(spec, **layout)
    return build_train_loader(config.data.path, seed=config.data.seed, mixture=mixture, **layout)


def _step(engine, batches, grad_accum: int, timer: PhaseTimer, device: torch.device, objective: Objective,
          want_ids: bool, varlen: bool) -> tuple[list[float], list[int]]:
    """One optimizer step over `grad_accum` micro-batches: this rank's summed total, ce and kd losses (kd 0
    without a teacher) and its sample indices."""
    losses, sample_ids = [], []
    timer.start()
    vocab_size = engine.module.config.vocab_size
    for _ in range(grad_accum):
        batch = next(batches)
        check_token_range(batch, vocab_size)
        timer.stop("data_wait_s")
        loss = objective(engine, model_inputs(batch, device, varlen), timer)
        engine.backward(loss.total)
        timer.stop("fwd_bwd_s")
        engine.step()  # the optimizer step (clip, AdamW, schedule) happens on the last micro-batch
        timer.stop("optim_s")
        kd = loss.kd if loss.kd is not None else torch.zeros_like(loss.ce)
        losses.append(torch.stack([loss.total.detach().float(), loss.ce.float(), kd.float()]))
        if want_ids:
            sample_ids += batch["sample_index"].tolist()
    # float64: summing fp32 losses is then exact, so 1 rank x 2g micro-batches and 2 ranks x g agree bit for bit
    return torch.stack(losses).double().sum(dim=0).tolist(), sample_ids


def check_token_range(batch: dict[str, torch.Tensor], vocab_size: int) -> None:
    """On the host batch, before it reaches the device: an id past the embedding is an IndexError (or a device
    assert) deep in the forward, naming nothing. A max over a few thousand ids costs microseconds."""
    ids = batch["input_ids"]
    if int(ids.max()) < vocab_size and int(ids.min()) >= 0:
        return
    row = int(((ids >= vocab_size) | (ids < 0)).any(dim=1).nonzero()[0])
    sample = int(batch["sample_index"][row]) if "sample_index" in batch else row
    bad = ids[row][(ids[row] >= vocab_size) | (ids[row] < 0)][0]
    raise TokenOutOfRange(f"sample {sample} holds token id {int(bad)}, outside the model's vocabulary of "
                          f"{vocab_size}: the shards were tokenized for another vocabulary; prepare them with the "
                          "model's tokenizer")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, varlen: bool = False) -> dict[str, Any]:
    """The forward arguments for one micro-batch (the objective predicts each id from the ones before it).

    With data.document_mask the batch carries position ids that restart at every document. For eager and sdpa,
    transformers turns those into a block-causal mask, but only when no KV cache is passed, hence `use_cache=False`
    spelled out here. Its flash-attention path reads them as documents only for a micro-batch of one row
    (`_is_packed_sequence`); otherwise it runs plain causal attention over each row, across documents. So for flash
    kernels (`varlen`, from `document_mask_inputs`) the inputs also carry every document's bounds in the micro-batch
    flattened row after row (`cu_seq_lens_q/k`, `max_length_q/k`), which transformers hands to the kernel's
    variable-length call in every layer: each row starts a document too, so no document sees another.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=True), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        if varlen:
            inputs.update(varlen_inputs(batch["position_ids"], device))
    return inputs


def varlen_inputs(position_ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Flash attention's variable-length arguments for host-side position ids [B, S]. Computed on the host, so the
    longest document costs no device synchronisation; transformers' `prepare_fa_kwargs_from_position_ids` would
    read it from the device in every layer."""
    bounds = document_bounds(position_ids.numpy())
    cu_seq_lens = torch.from_numpy(bounds).to(device, non_blocking=True)
    longest = int(np.diff(bounds).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


# Kernels for which transformers builds the block-causal mask from restarting position ids (masking_utils).
MASKED_FROM_POSITION_IDS = ("eager", "sdpa", "flex_attention")


def document_mask_inputs(config: RunConfig, model: PreTrainedModel) -> bool:
    """Whether the micro-batches need flash attention's variable-length arguments (`model_inputs`' `varlen`) for
    data.document_mask, from the attention kernel transformers really resolved for the built model (it may differ
    from the one asked for, e.g. a hub kernel when flash-attn is not installed). A kernel that keeps documents apart
    neither way is refused before the first step rather than letting them attend to each other silently."""
    if not config.data.document_mask:
        return False
    kernel: str = model.config._attn_implementation
    if is_flash_attention_requested(requested_attention_implementation=kernel):
        return True
    if kernel in MASKED_FROM_POSITION_IDS:
        return False
    raise ConfigError(f"data.document_mask=true: the model's attention kernel {kernel!r} "
                      f"(model.attn_implementation={config.model.attn_implementation}) neither builds a mask from "
                      "restarting position ids nor takes variable-length bounds, so packed documents would attend "
                      f"to each other; use model.attn_implementation={' or '.join(MASKED_FROM_POSITION_IDS[:2])} or "
                      "flash_attention_2, or data.document_mask=false")


def _check_finite(measured: StepMeasurement, state: LoopState, train_cfg: TrainConfig) -> int:
    """Consecutive skipped steps after `state.step`; raises NonFiniteLoss when the policy says stop."""
    loss, step = measured.loss, state.step
    if math.isfinite(loss) and measured.applied:
        return 0
    what = f"loss {loss}" if not math.isfinite(loss) else "non-finite gradients"
    last = state.last_checkpoint
    resume_hint = f"the newest complete checkpoint is {last}" if last else "no checkpoint yet"
    if train_cfg.nan_policy == "stop":
        raise NonFiniteLoss(f"step {step}: {what}; the update was not applied and training stops "
                            f"(train.nan_policy=stop). {resume_hint}; resume from it with a lower optim.lr, or "
                            "set train.nan_policy=skip to skip such steps")
    skips_in_a_row = state.skips_in_a_row + 1
    log.warning("step %d: %s, update skipped (%d in a row)", step, what, skips_in_a_row)
    if skips_in_a_row >= train_cfg.max_consecutive_skips:
        raise NonFiniteLoss(f"step {step}: {skips_in_a_row} non-finite steps in a row "
                            f"(train.max_consecutive_skips={train_cfg.max_consecutive_skips}); {resume_hint}")
    return skips_in_a_row


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None and math.isfinite(float(norm)) else None


def _record(state: LoopState, measured: StepMeasurement, run: LoopContext) -> dict[str, Any]:
    """The step's line of train_log.jsonl (its keys in this order)."""
    tokens_per_s = run.step_tokens / measured.step_time
    world_size = run.env.world_size
    return {
        "step": state.step,
        "tokens": run.tokens(state),
        "consumed_samples": state.consumed_samples,
        "loss": _finite_or_none(measured.loss),
        "ce_loss": _finite_or_none(measured.ce_loss),
        "kd_loss": _finite_or_none(measured.kd_loss),
        "lr": measured.lr,
        "grad_norm": measured.grad_norm,
        "skipped": not measured.applied,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world_size,
        "mfu": tokens_per_s * run.flops_per_token / (world_size * run.peak) if run.peak else None,
        "step_time_s": measured.step_time,
        **{key: measured.phases.get(key, 0.0) for key in ("data_wait_s", "teacher_s", "fwd_bwd_s", "optim_s")},
        "memory_gb": memory_gb(run.env.device),
        "time": time.time(),
    }


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _say(logger: TrainLogger | None, text: str) -> None:
    if logger is not None:  # rank 0 only; through tqdm so the progress bar is not torn
        logger.message(text)
