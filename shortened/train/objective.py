"""What one micro-batch optimizes: the next-token loss, or distillation from a frozen teacher (distill.teacher).

Both return the student's next-token loss as `ce`, so runs with and without a teacher compare on one number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from transformers import PreTrainedModel

from shortened.config import DistillConfig
from shortened.train.chunked_loss import next_token_loss
from shortened.train.distill_loss import distillation_losses
from shortened.train.metrics import PhaseTimer

# `logits_to_keep` as an empty index: the forward stops at the final norm's hidden states, and the vocabulary
# projection happens chunk by chunk inside the loss instead of for the whole micro-batch at once.
NO_LOGITS = torch.empty(0, dtype=torch.long)

# A loss of the final hidden states [B, S, H], the model and its input ids, as the forward's output dict.
HeadLoss = Callable[[torch.Tensor, Any, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MicroBatchLoss:
    total: torch.Tensor  # what backward runs on
    ce: torch.Tensor  # detached: the student's next-token loss
    kd: torch.Tensor | None  # detached: the KL term, None without a teacher


class Objective(Protocol):
    def __call__(self, engine: Any, inputs: dict[str, Any], timer: PhaseTimer) -> MicroBatchLoss: ...


class LossInForward:
    """Runs the engine's forward with a loss of the final hidden states computed inside it, as its output.

    DeepSpeed starts its backward bookkeeping (ZeRO's gradient-accumulation boundary) from hooks on the forward's
    outputs, and a loss computed after the forward would let the LM head's gradient reach ZeRO before it. So a
    forward hook on the decoder keeps its last hidden state (the only one: no `output_hidden_states`, which would
    keep every layer's), and one on the whole model replaces its output by the loss. Outside a training step
    (inline evaluation, export) both hooks leave everything alone.
    """

    def __init__(self, module: Any) -> None:
        self._loss: HeadLoss | None = None
        self._hidden: torch.Tensor | None = None
        module.base_model.register_forward_hook(self._keep_hidden)
        module.register_forward_hook(self._loss_as_output, with_kwargs=True)

    def __call__(self, engine: Any, inputs: dict[str, Any], loss: HeadLoss) -> dict[str, torch.Tensor]:
        self._loss = loss
        try:
            return engine(**inputs, logits_to_keep=NO_LOGITS.to(inputs["input_ids"].device))
        finally:
            self._loss = self._hidden = None

    def _keep_hidden(self, module: Any, args: tuple, output: Any) -> None:
        if self._loss is not None:
            self._hidden = output.last_hidden_state

    def _loss_as_output(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        loss, hidden = self._loss, self._hidden
        self._loss = self._hidden = None
        if loss is None or hidden is None:
            return None
        return loss(hidden, module, kwargs["input_ids"])


class NextTokenObjective:
    """The plain continued-pretraining loss: the shifted cross-entropy over every position (Hugging Face's with
    `labels=input_ids`), computed `chunk_size` positions at a time from the final hidden states through the LM head
    (`chunked_loss.next_token_loss`), never as full-vocabulary fp32 logits."""

    def __init__(self, engine: Any, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._forward = LossInForward(engine.module)

    def __call__(self, engine: Any, inputs: dict[str, Any], timer: PhaseTimer) -> MicroBatchLoss:
        loss = self._forward(engine, inputs, self._loss)["loss"]
        return MicroBatchLoss(total=loss, ce=loss.detach(), kd=None)

    def _loss(self, hidden: torch.Tensor, module: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        head = module.get_output_embeddings().weight  # the embedding itself in a tied model
        return {"loss": next_token_loss(hidden, head, input_ids, chunk_size=self.chunk_size)}


class DistillationObjective:
    """kd_weight x T² KL(teacher || student) + ce_weight x next-token loss, from both models' final hidden states.

    The teacher runs beside the student on the same inputs (position ids, varlen boundaries), so
    `data.document_mask` masks its attention too. The loss is the student forward's output (`LossInForward`).
    """

    def __init__(self, engine: Any, teacher: PreTrainedModel, distill: DistillConfig) -> None:
        self.teacher = teacher
        self.distill = distill
        self._forward = LossInForward(engine.module)
        self._teacher_hidden: torch.Tensor | None = None

    def __call__(self, engine: Any, inputs: dict[str, Any], timer: PhaseTimer) -> MicroBatchLoss:
        with torch.no_grad():
            self._teacher_hidden = self.teacher.base_model(**inputs).last_hidden_state
        timer.stop("teacher_s")
        try:
            out = self._forward(engine, inputs, self._loss)
        finally:
            self._teacher_hidden = None
        return MicroBatchLoss(total=out["loss"], ce=out["ce"], kd=out["kd"])

    def _loss(self, hidden: torch.Tensor, module: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self._teacher_hidden is not None  # set by __call__ around the forward that calls this
        losses = distillation_losses(
            hidden, module.get_output_embeddings().weight, self._teacher_hidden,
            self.teacher.get_output_embeddings().weight, input_ids, kd_weight=self.distill.kd_weight,
            ce_weight=self.distill.ce_weight, temperature=self.distill.temperature,
            chunk_size=self.distill.chunk_size)
        return {"loss": losses.total, "kd": losses.kd, "ce": losses.ce}
