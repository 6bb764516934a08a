"""The model, its optimizer groups, the learning-rate schedule, and the DeepSpeed engine around them."""
from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from shortened.config import ConfigError, ModelConfig, OptimConfig

log = logging.getLogger(__name__)


def hf_config_dict(model_dir: Path) -> dict[str, Any]:
    return AutoConfig.from_pretrained(model_dir).to_dict()


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 and newer). On AVX2-only CPUs bf16 matmuls are
    emulated: the tiny-cpu recipe's step then takes ~5x longer than in fp32 (measured on an AMD EPYC Zen 3)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume the configured precision is fine
        return True


def precision_dtype(precision: str) -> torch.dtype:
    """The weights' dtype of `train.precision` (bf16 keeps fp32 masters in the optimizer, not in the model)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model(config: ModelConfig, model_dir: Path, precision: str, seq_len: int) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=precision_dtype(precision),
                                                 attn_implementation=config.attn_implementation)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions} "
                          f"({model_dir}/config.json)")
    model.config.use_cache = False  # no KV cache in training; it would only hold memory
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (projections, embeddings, LM head); none on norm weights and biases.

    Group 0 decays and group 1 does not: `apply_optim_settings` relies on that order.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_optim_settings(engine, optim: OptimConfig, grad_clip: float) -> dict[str, Any]:
    """Put the config's optimizer settings back after a checkpoint load, which restores the saved ones.

    The optimizer's `load_state_dict` brings back the saved betas, eps, weight decay and the last step's learning
    rate, and DeepSpeed's ZeRO optimizer the saved clipping threshold; without this a resumed run silently trains
    with the old values while its config says otherwise. Returns the settings read back from the engine.
    """
    optimizer, scheduler = engine.optimizer, engine.lr_scheduler
    groups = optimizer.param_groups
    if len(groups) != 2:
        raise RuntimeError(f"expected the decay and no-decay parameter groups, the optimizer has {len(groups)}")
    scheduler.base_lrs = [optim.lr] * len(groups)
    for group, decay, lr_lambda in zip(groups, (optim.weight_decay, 0.0), scheduler.lr_lambdas):
        group.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=decay,
                     lr=optim.lr * lr_lambda(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
    optimizer.clip_grad = grad_clip
    return {"lr": groups[0]["lr"], "betas": list(groups[0]["betas"]), "eps": groups[0]["eps"],
            "weight_decay": [group["weight_decay"] for group in groups], "grad_clip": optimizer.clip_grad}


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of optim.lr for the update after `step` completed optimizer steps.

    Linear warmup to the peak over `warmup_steps` updates (the first update uses lr / warmup_steps), then
    constant, or a cosine from the peak to `min_lr_ratio` x peak reached at `total_steps` and held after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler_factory(optim: OptimConfig, total_steps: int):
    """A callable DeepSpeed turns into the scheduler once it has built the optimizer.

    The multiplier is a `partial` of a pure function, so LambdaLR's saved state is only the step count: the
    schedule on resume comes from the current config (a longer token budget stretches the cosine).
    """
    factor = partial(lr_factor, warmup_steps=optim.warmup_steps, total_steps=total_steps, schedule=optim.schedule,
                     min_lr_ratio=optim.min_lr_ratio)
    return lambda optimizer: LambdaLR(optimizer, factor)


def build_engine(model: PreTrainedModel, ds_config: dict[str, Any], optim: OptimConfig, total_steps: int):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, optim.weight_decay),
        config=ds_config,
        lr_scheduler=build_scheduler_factory(optim, total_steps),
    )
    return engine
