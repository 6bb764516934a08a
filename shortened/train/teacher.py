"""The frozen teacher of a distillation run: checked against the student before training, then loaded on each rank.

The teacher lies outside DeepSpeed: no optimizer state, no gradient buffers, one full copy per rank (as MiniLLM and
TRL do under ZeRO-1/2). Its forward is deterministic, so a resumed distillation run reproduces the uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from shortened.config import ConfigError, DistillConfig
from shortened.model_dir import check_model_dir
from shortened.modeling import train_flops_per_token
from shortened.tokenizer import TokenizerNotFound, load_tokenizer
from shortened.train.engine import hf_config_dict, precision_dtype


def check_teacher(distill: DistillConfig, student_config: dict[str, Any], student_dir: Path, tokenizer_sha256: str,
                  seq_len: int) -> None:
    """Refuse a teacher whose logits do not line up with the student's, before any weights are loaded: the KL
    compares both models' distributions over one vocabulary position by position."""
    check_same_token_space(Path(distill.teacher), "distill.teacher", "the KL needs one vocabulary", student_config,
                           student_dir, tokenizer_sha256, seq_len)


def check_same_token_space(model_dir: Path, key: str, why: str, student_config: dict[str, Any], student_dir: Path,
                           tokenizer_sha256: str, seq_len: int) -> None:
    """Refuse a model that scores the student's shards (a distillation teacher, dynamic loading's reference) when
    its ids would mean other tokens than the student's: another vocabulary size, another tokenizer of the same size
    (its losses would be of other text), or fewer positions than a training sequence. `key` names the setting,
    `why` what depends on it."""
    check_model_dir(model_dir, key)  # every rank loads it after this check, where a bad file is a traceback
    other_config = hf_config_dict(model_dir)
    other_vocab, student_vocab = other_config.get("vocab_size"), student_config.get("vocab_size")
    if other_vocab != student_vocab:
        raise ConfigError(f"{key}={model_dir} has vocab_size={other_vocab}, the student model.init_from={student_dir} "
                          f"has vocab_size={student_vocab}: {why}")
    try:
        other_tokenizer = load_tokenizer(model_dir)
    except TokenizerNotFound:
        raise ConfigError(f"{key}={model_dir} has no tokenizer.model / tokenizer.json to compare with the student's; "
                          "copy the student's tokenizer there if they share it") from None
    if other_tokenizer.sha256 != tokenizer_sha256:
        raise ConfigError(f"{key}={model_dir} has tokenizer {other_tokenizer.path.name} with sha256 "
                          f"{other_tokenizer.sha256[:12]}..., the student model.init_from={student_dir} and its data "
                          f"use sha256 {tokenizer_sha256[:12]}...: the same ids would mean other tokens")
    max_positions = other_config.get("max_position_embeddings")
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(f"data.seq_len={seq_len} exceeds {key}={model_dir}'s max_position_embeddings={max_positions}")


def load_teacher(distill: DistillConfig, precision: str, device: torch.device, attn_implementation: str
                 ) -> PreTrainedModel:
    """The teacher in `train.precision`, on this rank's device, in eval mode and with no parameter requiring grad.

    Loaded straight onto the device in its dtype (transformers reads the device context as the device map): a 7B
    teacher loaded on the host first and moved would hold 13.5 GB of host memory per rank on the way."""
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_pretrained(distill.teacher, dtype=precision_dtype(precision),
                                                       attn_implementation=attn_implementation)
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_flops_per_token(teacher: PreTrainedModel, seq_len: int) -> float:
    """The teacher's forward FLOPs per token: a third of its training FLOPs (forward 2N of the 6N)."""
    return train_flops_per_token(teacher.config, seq_len) / 3  # type: ignore[arg-type]  # any Llama-family config
