"""Knowledge distillation from the unpruned teacher (Minitron style), computed in chunks of positions.

The loss of one micro-batch is `kd_weight * T² * KL(teacher_T || student_T) + ce_weight * CE(student)`, both means
over the predicted positions, from the final hidden states of both models and their LM-head weights.

Why chunks, and why a fused autograd Function rather than per-chunk checkpointing: the logits of one model for a
micro-batch of 2 x 2048 tokens over the 32k vocabulary are 1 GiB in fp32, and the naive loss keeps several such
tensors (both models' logits, their log-softmaxes, the gradient) alive at once. Here the forward walks the positions
`chunk_size` rows at a time and, while a chunk's logits exist anyway, also computes the loss's gradient with respect
to them in closed form (KD: `T * (softmax(s/T) - softmax(t/T))`, CE: `softmax(s) - onehot`), folds it into the
gradient of the chunk's hidden rows and of the head weight, and drops the chunk. Nothing vocabulary-sized outlives a
chunk, in the forward or in the backward, which only scales the stored gradients by the incoming one: peak memory is
five `[chunk_size, vocab]` fp32 tensors plus buffers the size of the hidden states and of the head (its fp32
gradient, fp32 copies of bf16 heads), whatever the sequence length (the idea of Liger-Kernel's fused linear losses).
Checkpointing each chunk would bound memory as well but computes every student logit twice (forward, then
recomputation in backward) and needs one autograd graph per chunk; the closed-form gradient costs one matmul less.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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

    Logits are computed in fp32 whatever the inputs' dtype; gradients are returned in the inputs' dtypes. The
    teacher's tensors get no gradient (they come from a frozen model).
    """
    batch, seq_len, _ = student_hidden.shape
    if input_ids.shape != (batch, seq_len) or teacher_hidden.shape[:2] != (batch, seq_len):
        raise ValueError(f"student hidden {tuple(student_hidden.shape)}, teacher hidden "
                         f"{tuple(teacher_hidden.shape)} and input_ids {tuple(input_ids.shape)} disagree on [B, S]")
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_head_weight.shape[0]} != teacher vocabulary "
                         f"{teacher_head_weight.shape[0]}: distillation compares the same tokens")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    device = student_hidden.device
    if valid is None:
        valid = torch.ones(batch, seq_len - 1, dtype=torch.bool, device=device)
    elif valid.shape != (batch, seq_len - 1) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, S - 1] = {[batch, seq_len - 1]}, got {valid.dtype} "
                         f"{list(valid.shape)}")
    # Rows of the [B * S, H] views that predict a counted token: position (b, t) is row b * S + t, its target t + 1.
    starts = torch.arange(batch, device=device)[:, None] * seq_len
    rows = (starts + torch.arange(seq_len - 1, device=device))[valid.to(device)]
    total, kd, ce = _ChunkedDistillation.apply(student_hidden, student_head_weight, teacher_hidden.detach(),
                                               teacher_head_weight.detach(), input_ids, rows, kd_weight, ce_weight,
                                               temperature, chunk_size, torch.is_grad_enabled())
    return DistillLosses(total=total, kd=kd, ce=ce)


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and its gradient in one chunked pass (see the module docstring); backward only scales the result."""

    @staticmethod
    def forward(ctx: Any, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor, kd_weight: float,
                ce_weight: float, temperature: float, chunk_size: int,
                grad_enabled: bool) -> tuple[torch.Tensor, ...]:
        # needs_input_grad stays True under no_grad: without the check, evaluation would pay for the gradients too.
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        targets = input_ids.reshape(-1)[rows + 1]
        # The heads are cast once, not once per chunk: their size is the model's, not the sequence's.
        weight, t_weight = student_weight.float(), teacher_weight.float()
        device = hidden.device
        count = max(len(rows), 1)
        kd_scale, ce_scale = kd_weight * temperature / count, ce_weight / count
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_weight else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        for begin in range(0, len(rows), chunk_size):
            chunk_rows = rows[begin:begin + chunk_size]
            target = targets[begin:begin + chunk_size]
            h = hidden.index_select(0, chunk_rows).float()
            logits = h @ weight.T
            lse = logits.logsumexp(dim=1, keepdim=True)
            ce_sum += (lse.squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
            # At T = 1 (the Minitron default) the student's log-softmax is the CE's, already normalised by `lse`.
            log_ps = logits - lse if temperature == 1.0 else logits / temperature
            if temperature != 1.0:
                log_ps -= log_ps.logsumexp(dim=1, keepdim=True)
            log_pt = t_hidden.index_select(0, chunk_rows).float() @ t_weight.T
            if temperature != 1.0:
                log_pt /= temperature
            log_pt -= log_pt.logsumexp(dim=1, keepdim=True)
            pt = log_pt.exp()
            # Each [chunk, V] buffer is reused in place once its value is spent: at most five exist at a time.
            kd_sum += log_pt.sub_(log_ps).mul_(pt).sum()
            del log_pt
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = log_ps.exp_().sub_(pt).mul_(kd_scale)
            del pt
            if ce_scale:  # ce_weight = 0 (the Minitron default): the CE is logged, not differentiated
                probs = logits.sub_(lse).exp_()
                probs[torch.arange(len(target), device=device), target] -= 1.0
                grad_logits.add_(probs, alpha=ce_scale)
                del probs
            del logits
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, chunk_rows, grad_logits @ weight)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
        kd = kd_sum * (temperature ** 2 / count)
        ce = ce_sum / count
        total = kd_weight * kd + ce_weight * ce
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.shapes_dtypes = (student_hidden.shape, student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        shape, hidden_dtype, weight_dtype = ctx.shapes_dtypes
        hidden_out = None if grad_hidden is None else (grad_hidden * grad_total).to(hidden_dtype).reshape(shape)
        weight_out = None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype)
        return hidden_out, weight_out, None, None, None, None, None, None, None, None, None
