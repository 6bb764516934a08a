"""Knowledge distillation from the unpruned teacher (Minitron style), computed in chunks of positions.

The loss of one micro-batch is `kd_weight * T² * KL(teacher_T || student_T) + ce_weight * CE(student)`, both means
over the predicted positions, from the final hidden states of both models and their LM-head weights.

The logits of one model for a micro-batch of 2 x 2048 tokens over the 32k vocabulary are 1 GiB in fp32, and the naive
loss keeps several such tensors (both models' logits, their log-softmaxes, the gradient) alive at once. The chunked
driver of `chunked_loss.py` walks the positions `chunk_size` rows at a time and folds each chunk's closed-form
gradient (KD: `T * (softmax(s/T) - softmax(t/T))`, CE: `softmax(s) - onehot`) into the gradients of the hidden rows
and of the head weight: peak memory is five `[chunk_size, vocab]` fp32 tensors plus buffers the size of the hidden
states and of the head (its gradient), whatever the sequence length.

Both heads multiply in the training dtype (bf16 on a GPU: the tensor cores' rate, where fp32 units ran the 2.7B
recipe's 4.3 TFLOP of KD head matmuls a micro-step at an eighth of it), and only what the accuracy needs is fp32: each
chunk's logits are upcast once, and the softmaxes, logsumexps and KL sums run on the upcast copy, as in the plain
loss. fp32 training multiplies in fp32 (TF32 on CUDA: `shortened/train/engine.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shortened.train.chunked_loss import fused_head_loss


@dataclass(frozen=True)
class DistillLosses:
    """One micro-batch's losses. Only `total` carries a gradient; `kd` and `ce` are detached, for logging."""

    total: torch.Tensor  # kd_weight * kd + ce_weight * ce, differentiable w.r.t. the student's hidden states and head
    kd: torch.Tensor  # T² * forward KL(teacher || student) at temperature T, mean over counted positions
    ce: torch.Tensor  # the student's next-token cross-entropy (T = 1), mean over counted positions


def distillation_losses(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                        teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, input_ids: torch.Tensor, *,
                        kd_weight: float, ce_weight: float, temperature: float, chunk_size: int,
                        valid: torch.Tensor | None = None) -> DistillLosses:
    """The distillation and cross-entropy losses of one micro-batch, never holding more than `chunk_size` logit rows.

    student_hidden [B, S, H] and teacher_hidden [B, S, H_t] are the final hidden states (after the final RMSNorm,
    `model.model(...).last_hidden_state`); the head weights are [V, H] and [V, H_t]. Position t predicts token t + 1,
    as in Hugging Face's causal-LM loss with `labels=input_ids`. `valid` is an optional bool [B, S - 1] mask over
    those predictions (True: counted); the means are over counted positions, like `cross_entropy(ignore_index=...)`,
    except that a micro-batch with none counted gives 0 rather than NaN, so that it cannot poison the optimizer.

    Each model's logits are its hidden states times its head in their own dtype (bf16 in bf16 training), upcast to
    fp32 for the softmaxes, logsumexps and sums; gradients are returned in the inputs' dtypes. The teacher's tensors
    get no gradient (they come from a frozen model).
    """
    batch, seq_len, _ = student_hidden.shape
    if teacher_hidden.shape[:2] != (batch, seq_len):
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} disagree on [B, S]")
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_head_weight.shape[0]} != teacher vocabulary "
                         f"{teacher_head_weight.shape[0]}: distillation compares the same tokens")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    terms = _DistillationTerms(teacher_hidden.detach(), teacher_head_weight.detach(), kd_weight=kd_weight,
                               ce_weight=ce_weight, temperature=temperature)
    total, kd, ce = fused_head_loss(student_hidden, student_head_weight, input_ids, terms, chunk_size=chunk_size,
                                    compute_dtype=student_hidden.dtype, valid=valid)
    return DistillLosses(total=total, kd=kd, ce=ce)


class _DistillationTerms:
    """One chunk's KL and CE sums and the gradient of kd_weight * KD + ce_weight * CE w.r.t. the student's logits,
    in fp32 (the teacher's logits of the same rows computed here, in the teacher's dtype, under no gradient)."""

    size = 2  # kd, ce

    def __init__(self, teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, *, kd_weight: float,
                 ce_weight: float, temperature: float) -> None:
        self.teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        self.teacher_weight = teacher_head_weight.to(teacher_hidden.dtype)  # cast (if at all) once, not per chunk
        self.kd_weight, self.ce_weight, self.temperature = kd_weight, ce_weight, temperature

    def chunk(self, logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, count: int, want_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        temperature = self.temperature
        logits = logits.float()  # the training dtype's product, upcast once: the chunk's only fp32 copy of it
        lse = logits.logsumexp(dim=1, keepdim=True)
        ce_sum = (lse.squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
        # At T = 1 (the Minitron default) the student's log-softmax is the CE's, already normalised by `lse`.
        log_ps = logits - lse if temperature == 1.0 else logits / temperature
        if temperature != 1.0:
            log_ps -= log_ps.logsumexp(dim=1, keepdim=True)
        log_pt = (self.teacher_hidden.index_select(0, rows) @ self.teacher_weight.T).float()
        if temperature != 1.0:
            log_pt /= temperature
        log_pt -= log_pt.logsumexp(dim=1, keepdim=True)
        pt = log_pt.exp()
        # Each [chunk, V] buffer is reused in place once its value is spent: at most five exist at a time.
        kd_sum = log_pt.sub_(log_ps).mul_(pt).sum()
        del log_pt
        sums = torch.stack([kd_sum, ce_sum])
        if not want_grad:
            return sums, None
        grad_logits = log_ps.exp_().sub_(pt).mul_(self.kd_weight * temperature / count)
        del pt
        if self.ce_weight:  # ce_weight = 0 (the Minitron default): the CE is logged, not differentiated
            probs = logits.sub_(lse).exp_()
            probs[torch.arange(len(target), device=probs.device), target] -= 1.0
            grad_logits.add_(probs, alpha=self.ce_weight / count)
        return sums, grad_logits

    def finish(self, sums: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        kd = sums[0] * (self.temperature ** 2 / count)
        ce = sums[1] / count
        return self.kd_weight * kd + self.ce_weight * ce, kd, ce
