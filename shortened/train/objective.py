"""What one micro-batch optimizes: the next-token loss, or distillation from a frozen teacher (distill.teacher).

Both return the student's next-token loss as `ce`, so runs with and without a teacher compare on one number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from shortened.config import DistillConfig
from shortened.train.distill_loss import distillation_losses
from shortened.train.metrics import PhaseTimer

# `logits_to_keep` as an empty index: the student's forward stops at the final norm's hidden states, and the
# vocabulary projection happens chunk by chunk inside the loss instead of for the whole micro-batch at once.
NO_LOGITS = torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class MicroBatchLoss:
    total: torch.Tensor  # what backward runs on
    ce: torch.Tensor  # detached: the student's next-token loss
    kd: torch.Tensor | None  # detached: the KL term, None without a teacher


class Objective(Protocol):
    def __call__(self, engine: Any, inputs: dict[str, Any], timer: PhaseTimer) -> MicroBatchLoss: ...


class NextTokenObjective:
    """The plain continued-pretraining loss: HF's shifted cross-entropy over every position."""

    def __call__(self, engine: Any, inputs: dict[str, Any], timer: PhaseTimer) -> MicroBatchLoss:
        loss = engine(**inputs).loss
        return MicroBatchLoss(total=loss, ce=loss.detach(), kd=None)


class DistillationObjective:
    """kd_weight x T² KL(teacher || student) + ce_weight x next-token loss, from both models' final hidden states.

    The teacher runs beside the student with the same position ids, so `data.document_mask` masks its attention
    too. The loss is computed inside the student's forward, by a forward hook that makes it the engine's output:
    DeepSpeed starts its backward bookkeeping (ZeRO's gradient-accumulation boundary) from hooks on the forward's
    outputs, and a loss computed after the forward would let the LM head's gradient reach ZeRO before it. Outside
    a training step (inline evaluation, export) the hook leaves the output alone.
    """

    def __init__(self, engine: Any, teacher: PreTrainedModel, distill: DistillConfig) -> None:
        self.teacher = teacher
        self.distill = distill
        self._teacher_hidden: torch.Tensor | None = None
        engine.module.register_forward_hook(self._loss_as_output, with_kwargs=True)

    def __call__(self, engine: Any, inputs: dict[str, Any], timer: PhaseTimer) -> MicroBatchLoss:
        positions = {key: inputs[key] for key in ("input_ids", "position_ids") if key in inputs}
        with torch.no_grad():
            self._teacher_hidden = self.teacher.base_model(**positions, use_cache=False).last_hidden_state
        timer.stop("teacher_s")
        try:
            out = engine(**positions, use_cache=False, output_hidden_states=True,
                         logits_to_keep=NO_LOGITS.to(inputs["input_ids"].device))
        finally:
            self._teacher_hidden = None
        return MicroBatchLoss(total=out["loss"], ce=out["ce"], kd=out["kd"])

    def _loss_as_output(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        teacher_hidden, self._teacher_hidden = self._teacher_hidden, None
        if teacher_hidden is None:
            return None
        losses = distillation_losses(
            output.hidden_states[-1], module.get_output_embeddings().weight,
            teacher_hidden, self.teacher.get_output_embeddings().weight, kwargs["input_ids"],
            kd_weight=self.distill.kd_weight, ce_weight=self.distill.ce_weight,
            temperature=self.distill.temperature, chunk_size=self.distill.chunk_size)
        return {"loss": losses.total, "kd": losses.kd, "ce": losses.ce}
