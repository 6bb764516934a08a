"""Losses over the LM head computed chunk by chunk of positions: no vocabulary-sized tensor for the whole micro-batch.

A loss of the logits `hidden @ head.T` needs, naively, the full [positions, vocabulary] logits, their softmax and
their gradient at once: 1 GiB per fp32 copy for 2 x 2048 positions at a 32k vocabulary, 4 GiB at Llama-3's 128k.
Here the forward walks the predicted positions `chunk_size` rows at a time and, while a chunk's logits exist anyway,
also computes the loss's gradient with respect to them in closed form, folds it into the gradient of the chunk's
hidden rows and of the head weight, and drops the chunk (the idea of Liger-Kernel's fused linear losses). Nothing
vocabulary-sized outlives a chunk, in the forward or in the backward, which only scales the stored gradients by the
incoming one. Checkpointing each chunk would bound memory as well but computes every logit twice and needs one
autograd graph per chunk; the closed-form gradient costs one matmul less.

The driver (`_FusedHeadLoss`) owns the chunking, the matmuls and the gradient buffers; a loss supplies only what it
does with one chunk's logits (`ChunkTerms`): the plain next-token loss here, the distillation loss in
`distill_loss.py`. Position t predicts token t + 1, as in Hugging Face's causal-LM loss with `labels=input_ids`.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class ChunkTerms(Protocol):
    """What one loss does with a chunk of logits. `count` is the number of counted positions of the whole
    micro-batch (at least 1), which the means divide by."""

    size: int  # how many terms are summed over the chunks

    def chunk(self, logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, count: int, want_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk's contribution to each summed term (fp32 [size]), and, when `want_grad`, the gradient of the
        optimized total with respect to `logits` (may reuse `logits`' memory; None when the total has no gradient).
        `rows` are the chunk's rows of the flattened [B * S] positions, `target` the tokens they predict."""
        ...

    def finish(self, sums: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        """(total, *logged terms) from the summed terms."""
        ...


def predicted_rows(input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened [B * S] positions that predict a counted token, and the tokens they predict.

    Position (b, t) is row b * S + t, its target input_ids[b, t + 1]: every position but each sequence's last.
    `valid` (bool [B, S - 1], True: counted) selects among those; the selection's size is data-dependent, so it
    synchronizes with the device, and only a caller that asks for a mask pays for that.
    """
    batch, seq_len = input_ids.shape
    device = input_ids.device
    rows = torch.arange(batch, device=device)[:, None] * seq_len + torch.arange(seq_len - 1, device=device)
    if valid is None:
        rows = rows.reshape(-1)
    elif valid.shape != (batch, seq_len - 1) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, S - 1] = {[batch, seq_len - 1]}, got {valid.dtype} "
                         f"{list(valid.shape)}")
    else:
        rows = rows[valid.to(device)]
    return rows, input_ids.reshape(-1)[rows + 1]


def fused_head_loss(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor, terms: ChunkTerms, *,
                    chunk_size: int, compute_dtype: torch.dtype, valid: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, ...]:
    """`terms.finish`'s (total, *logged) over the predictions of `input_ids` from `hidden` [B, S, H] through
    `head_weight` [V, H], `chunk_size` positions at a time, the matmuls in `compute_dtype`.

    Only the total is differentiable (with respect to `hidden` and `head_weight`, gradients in their dtypes); the
    logged terms are detached. A micro-batch with no counted position gives zeros rather than NaN.
    """
    batch, seq_len, _ = hidden.shape
    if input_ids.shape != (batch, seq_len):
        raise ValueError(f"hidden states {tuple(hidden.shape)} and input_ids {tuple(input_ids.shape)} disagree on "
                         "[B, S]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, targets = predicted_rows(input_ids, valid)
    return _FusedHeadLoss.apply(hidden, head_weight, rows, targets, terms, chunk_size, compute_dtype,
                                torch.is_grad_enabled())


class NextTokenTerms:
    """The next-token cross-entropy: logsumexp and softmax in fp32 per chunk, the mean over counted positions."""

    size = 1

    def chunk(self, logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, count: int, want_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits.float()
        lse = logits.logsumexp(dim=1, keepdim=True)
        ce_sum = (lse.squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
        if not want_grad:
            return ce_sum[None], None
        probs = logits.sub_(lse).exp_()  # d CE / d logits = softmax - onehot, over the mean's count
        probs[torch.arange(len(target), device=probs.device), target] -= 1.0
        return ce_sum[None], probs.div_(count)

    def finish(self, sums: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        return (sums[0] / count,)


def next_token_loss(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor, *, chunk_size: int,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """The mean next-token cross-entropy of `input_ids` from the final hidden states [B, S, H] and the LM head
    [V, H]: Hugging Face's `ForCausalLMLoss` with `labels=input_ids` (or those of `valid`, the rest -100), without
    its full-vocabulary fp32 logits. The matmuls run in the hidden states' dtype (bf16 in training), the logsumexp
    and softmax in fp32; at most one chunk's [chunk_size, V] logits, fp32 copy and gradient exist at a time."""
    (loss,) = fused_head_loss(hidden, head_weight, input_ids, NextTokenTerms(), chunk_size=chunk_size,
                              compute_dtype=hidden.dtype, valid=valid)
    return loss


class _FusedHeadLoss(torch.autograd.Function):
    """Loss and its gradient in one chunked pass (see the module docstring); backward only scales the result."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, head_weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                terms: ChunkTerms, chunk_size: int, compute_dtype: torch.dtype,
                grad_enabled: bool) -> tuple[torch.Tensor, ...]:
        # needs_input_grad stays True under no_grad: without the check, evaluation would pay for the gradients too.
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        # The head is cast once, not once per chunk: its size is the model's, not the sequence's.
        weight = head_weight.to(compute_dtype)
        device = flat.device
        grad_hidden = torch.zeros(flat.shape, dtype=compute_dtype, device=device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=device) if want_weight else None
        count = max(len(rows), 1)  # no counted position: every sum is 0, and so is every mean (never 0 / 0)
        sums = torch.zeros(terms.size, dtype=torch.float32, device=device)
        for begin in range(0, len(rows), chunk_size):
            chunk_rows = rows[begin:begin + chunk_size]
            h = flat.index_select(0, chunk_rows).to(compute_dtype)
            chunk_sums, grad_logits = terms.chunk(h @ weight.T, targets[begin:begin + chunk_size], chunk_rows, count,
                                                  want_hidden or want_weight)
            sums += chunk_sums
            if grad_logits is None:
                continue
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, chunk_rows, grad_logits @ weight)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
            del grad_logits
        total, *logged = terms.finish(sums, count)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.shapes_dtypes = (hidden.shape, hidden.dtype, head_weight.dtype)
        ctx.mark_non_differentiable(*logged)
        return (total, *logged)

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        shape, hidden_dtype, weight_dtype = ctx.shapes_dtypes
        # Scaled in place: a copy of the head-sized gradient would be the step's largest buffer. The stored
        # gradients serve this one backward (a second one, through retain_graph, is not supported).
        hidden_out = None if grad_hidden is None else grad_hidden.mul_(grad_total).to(hidden_dtype).reshape(shape)
        weight_out = None if grad_weight is None else grad_weight.mul_(grad_total).to(weight_dtype)
        return hidden_out, weight_out, None, None, None, None, None, None
