"""DeepSpeed's JSON, derived from the typed run config and the world size.

The file named by `deepspeed_config` holds engine tuning only (ZeRO stage, buckets, overlap, communication
dtype). Everything that decides *what* is trained — batch sizes, precision, gradient accumulation dtype,
clipping, the optimizer — is derived from `RunConfig` here; a file that sets one of those keys to a different
value is an error naming the key and the config field that owns it, so the two can never disagree.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from shortened.config import MISSING, ConfigError, RunConfig, dotted_value

SUPPORTED_ZERO_STAGES = (1, 2)
FORBIDDEN = ("scheduler", "fp16")  # sections that would fight the trainer's own LR schedule and bf16 setup
# Which typed-config field owns each derived DeepSpeed key (named in the error when a file disagrees).
OWNERS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x world size)",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision (fp16 is not supported: bf16 needs no loss scaling)",
    "data_types": "the trainer (gradients always accumulate in fp32)",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule / optim.warmup_steps",
    "checkpoint": "the trainer (universal loading is chosen at resume)",
}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the checkout, so recipes work from any working directory."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return repo_root() / candidate


def read_base_config(path: str) -> dict[str, Any]:
    file = resolve_path(path)
    try:
        base = json.loads(file.read_text())
    except OSError as err:
        raise ConfigError(f"deepspeed_config: cannot read {file} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed_config: {file} is not valid JSON: {err}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed_config: {file} must hold a JSON object")
    return base


def build_deepspeed_config(config: RunConfig, world_size: int, *, on_cuda: bool,
                           load_universal: bool = False) -> dict[str, Any]:
    """The complete DeepSpeed config for `world_size` ranks; raises ConfigError on any disagreement."""
    source = str(resolve_path(config.deepspeed_config))
    base = read_base_config(config.deepspeed_config)
    stage = base.get("zero_optimization", {}).get("stage")
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"{source}: zero_optimization.stage is {stage!r}; this trainer supports ZeRO stages 1 and 2 "
            "(every rank holds whole bf16 weights, which the HF export and inline evaluation rely on)"
        )
    train, optim = config.train, config.optim
    derived = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps(world_size),
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == "bf16"},
        "data_types": {"grad_accum_dtype": "fp32"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW: fused kernel on CUDA, foreach on CPU; nothing to JIT-compile on either.
                "torch_adam": True,
                **({"fused": True} if on_cuda else {}),
            },
        },
        "checkpoint": {"load_universal": load_universal},
    }
    forbidden = [key for key in FORBIDDEN if _enabled(base.get(key))]
    if forbidden:
        key = forbidden[0]
        raise ConfigError(f"{source}: {key!r} must not be set here; it belongs to {OWNERS[key]}")
    for dotted, value in _leaves(derived):
        given = dotted_value(base, dotted)
        if given is not MISSING and given != "auto" and given != value:
            owner = OWNERS[dotted.split(".")[0]]
            raise ConfigError(
                f"{source}: {dotted}={given!r} disagrees with the run config ({value!r}, from {owner}); "
                f"remove it from the JSON and set {owner} instead"
            )
    merged = _merge(copy.deepcopy(base), derived)
    merged.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; DeepSpeed's own step prints are noise
    return merged


def _enabled(section: Any) -> bool:
    if section is None:
        return False
    return not (isinstance(section, dict) and section.get("enabled") is False)


def _leaves(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _merge(given: Any, value: Any) -> Any:
    if isinstance(given, dict) and isinstance(value, dict):
        merged = dict(given)
        for key, sub in value.items():
            merged[key] = _merge(given.get(key), sub)
        return merged
    return value
