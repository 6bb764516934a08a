"""Block-importance criteria. Each scores the blocks of the model as it is now (wrap it in `skip_blocks` to score
a model with blocks already taken out); for every criterion a lower score means "remove first".

- ppl: calibration perplexity with the block skipped (Shortened LLaMA).
- taylor: sum over the block's weights of |W * dL/dW|, the gradient summed over all calibration tokens (LLM-Pruner,
  Shortened LLaMA's Taylor+ when combined with the protect heuristic).
- magnitude: sum of |W| over the block.
- bi: Block Influence, 1 - cos(block input, block output) averaged over calibration tokens (ShortGPT).
- angular: (1/pi) arccos of the cosine between the input of block l and the output of block l+n-1 at the final token,
  averaged over samples (Gromov et al.); one score per run start l.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shortened.prune.blocks import decoder_layers, skip_blocks

CRITERIA = ("ppl", "taylor", "magnitude", "bi", "angular")
GRADIENT_CRITERIA = ("taylor",)


def compute_context(model: nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` when the weights are in another dtype (fp32 weights, bf16 compute), nothing when they
    already are `dtype`."""
    weight_dtype = next(model.parameters()).dtype
    if weight_dtype == dtype:
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)


def _batches(windows: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size].to(device)


def _nll_sum(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype) -> float:
    """exp of the mean next-token NLL over every predicted token of the windows."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    with compute_context(model, dtype):
        for batch in _batches(windows, batch_size, device):
            total += _nll_sum(model, batch).double().cpu()
    return math.exp(total.item() / (windows.shape[0] * (windows.shape[1] - 1)))


def ppl_scores(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype) -> list[float]:
    num_blocks = len(decoder_layers(model))
    scores = []
    for index in tqdm(range(num_blocks), desc="ppl: skip each block", unit="block"):
        with skip_blocks(model, [index]):
            scores.append(perplexity(model, windows, batch_size, dtype))
    return scores


def taylor_scores(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype) -> list[float]:
    """`taylor_block_score` of every block, one block at a time: at any moment only one block has fp32 weights
    and gradients, so memory is the model in its own dtype plus one block in fp32 plus activations."""
    num_blocks = len(decoder_layers(model))
    return [taylor_block_score(model, index, windows, batch_size, dtype)
            for index in tqdm(range(num_blocks), desc="taylor: one block at a time", unit="block")]


def taylor_block_score(
    model: nn.Module, index: int, windows: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> float:
    """Sum over block `index`'s weights of |W * G|, G the gradient of the mean calibration loss, accumulated in fp32
    over all batches. The model is left as it was: the same parameters, dtypes and requires_grad flags, no .grad."""
    block = decoder_layers(model)[index]
    device = next(model.parameters()).device
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    compute = _taylor_context(model, dtype)  # checked before any parameter is swapped
    # Nothing before the block requires grad, so autograd records no graph there: the graph starts at its input.
    with _frozen(model), _fp32_trainable_copy(block) as params, compute:
        for batch in _batches(windows, batch_size, device):
            # Dividing by all calibration tokens makes the summed gradient that of the mean loss, whatever batch_size.
            (_nll_sum(model, batch) / tokens).backward()
    with torch.no_grad():
        return sum((p.double() * p.grad.double()).abs().sum().item() for p in params if p.grad is not None)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside; every flag is restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def _fp32_trainable_copy(block: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Swap each parameter of `block` for an fp32 copy that requires grad (gradients then accumulate in fp32 in the
    copy's .grad); the original Parameter objects are put back on exit. An fp32 weight is shared, not copied:
    nothing writes to it."""
    slots = [(module, name, param) for module in block.modules()
             for name, param in module.named_parameters(recurse=False)]
    copies: dict[nn.Parameter, nn.Parameter] = {}
    for module, name, param in slots:
        if param not in copies:  # a weight shared within the block stays shared, so its gradient is not split
            copies[param] = nn.Parameter(param.detach().to(torch.float32), requires_grad=True)
        setattr(module, name, copies[param])
    try:
        yield list(copies.values())
    finally:
        for module, name, param in slots:
            setattr(module, name, param)


def _taylor_context(model: nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The fp32 block meets the other blocks' activations in `dtype`: autocast runs its matmuls (and those of an
    fp32 model) in `dtype`. Without autocast, for `dtype` float32, every weight must already be fp32."""
    if dtype != torch.float32:
        return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("taylor with dtype float32 needs the model's weights in float32; load it in float32 or "
                         "score in the dtype it is loaded in")
    return contextlib.nullcontext()


@torch.no_grad()
def magnitude_scores(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype) -> list[float]:
    return [sum(p.double().abs().sum().item() for p in layer.parameters()) for layer in decoder_layers(model)]


@contextlib.contextmanager
def _block_io_hooks(model: nn.Module, on_block: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call `on_block(index, block_input, block_output)` for every block during forward passes."""

    def hook(index: int):
        def capture(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            on_block(index, hidden_in, output[0] if isinstance(output, tuple) else output)

        return capture

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(decoder_layers(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 so that an exact identity block scores exactly 1, not 1 +- a float32 ulp.
    return F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)


@torch.no_grad()
def bi_scores(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype) -> list[float]:
    num_blocks = len(decoder_layers(model))
    cos_sum = torch.zeros(num_blocks, dtype=torch.float64)
    count = 0

    def on_block(index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        cos_sum[index] += _cosine(hidden_in, hidden_out).sum().cpu()

    device = next(model.parameters()).device
    with _block_io_hooks(model, on_block), compute_context(model, dtype):
        for batch in _batches(windows, batch_size, device):
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    return (1.0 - cos_sum / count).tolist()


@torch.no_grad()
def angular_scores(
    model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype, run_length: int = 1
) -> list[float]:
    """Distance for the run of `run_length` blocks starting at each block l, l = 0 .. L - run_length."""
    num_blocks = len(decoder_layers(model))
    if not 1 <= run_length <= num_blocks:
        raise ValueError(f"angular run length {run_length} must lie in 1..{num_blocks}")
    boundaries: list[list[torch.Tensor]] = [[] for _ in range(num_blocks + 1)]  # boundary l = input of block l

    def on_block(index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if index == 0:
            boundaries[0].append(hidden_in[:, -1].double().cpu())
        boundaries[index + 1].append(hidden_out[:, -1].double().cpu())

    device = next(model.parameters()).device
    with _block_io_hooks(model, on_block), compute_context(model, dtype):
        for batch in _batches(windows, batch_size, device):
            model(input_ids=batch, use_cache=False)
    states = [torch.cat(chunks) for chunks in boundaries]
    return [
        (torch.arccos(_cosine(states[start], states[start + run_length])) / math.pi).mean().item()
        for start in range(num_blocks - run_length + 1)
    ]


SCORERS: dict[str, Callable[..., list[float]]] = {
    "ppl": ppl_scores,
    "taylor": taylor_scores,
    "magnitude": magnitude_scores,
    "bi": bi_scores,
    "angular": angular_scores,
}
