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
from shortened.modeling import train_flops_per_token
from shortened.tokenizer import TokenizerNotFound, load_tokenizer
from shortened.train.engine import hf_config_dict, precision_dtype


def check_teacher(distill: DistillConfig, student_config: dict[str, Any], student_dir: Path, tokenizer_sha256: str,
                  seq_len: int) -> None:
    """Refuse a teacher whose logits do not line up with the student's, before any weights are loaded.

    The KL compares both models' distributions over one vocabulary position by position: another vocabulary size, or
    another tokenizer with the same size, would train the student towards the wrong tokens.
    """
    teacher_dir = Path(distill.teacher)
    config_file = teacher_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"distill.teacher={teacher_dir}: no such Hugging Face model directory ({config_file} is "
                          "missing)")
    teacher_config = hf_config_dict(teacher_dir)
    teacher_vocab, student_vocab = teacher_config.get("vocab_size"), student_config.get("vocab_size")
    if teacher_vocab != student_vocab:
        raise ConfigError(f"distill.teacher={teacher_dir} has vocab_size={teacher_vocab}, the student "
                          f"model.init_from={student_dir} has vocab_size={student_vocab}: the KL needs one vocabulary")
    try:
        teacher_tokenizer = load_tokenizer(teacher_dir)
    except TokenizerNotFound:
        raise ConfigError(f"distill.teacher={teacher_dir} has no tokenizer.model / tokenizer.json to compare with the "
                          f"student's; copy the student's tokenizer there if they share it") from None
    if teacher_tokenizer.sha256 != tokenizer_sha256:
        raise ConfigError(f"distill.teacher={teacher_dir} has tokenizer {teacher_tokenizer.path.name} with sha256 "
                          f"{teacher_tokenizer.sha256[:12]}..., the student model.init_from={student_dir} and its data "
                          f"use sha256 {tokenizer_sha256[:12]}...: the same ids would mean other tokens")
    max_positions = teacher_config.get("max_position_embeddings")
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(f"data.seq_len={seq_len} exceeds distill.teacher={teacher_dir}'s "
                          f"max_position_embeddings={max_positions}")


def load_teacher(distill: DistillConfig, precision: str, device: torch.device, attn_implementation: str
                 ) -> PreTrainedModel:
    """The teacher in `train.precision`, on this rank's device, in eval mode and with no parameter requiring grad."""
    teacher = AutoModelForCausalLM.from_pretrained(distill.teacher, dtype=precision_dtype(precision),
                                                   attn_implementation=attn_implementation)
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    teacher.to(device)  # type: ignore[arg-type]  # transformers' stub types .to() for dtypes only
    return teacher.eval()


def teacher_flops_per_token(teacher: PreTrainedModel, seq_len: int) -> float:
    """The teacher's forward FLOPs per token: a third of its training FLOPs (forward 2N of the 6N)."""
    return train_flops_per_token(teacher.config, seq_len) / 3  # type: ignore[arg-type]  # any Llama-family config
