"""Kernel choices of the trained model: `train.compile` (torch.compile per decoder block) and `model.liger`
(Liger-Kernel's fused RMSNorm, RoPE and SwiGLU). Checked before the model is loaded, applied before DeepSpeed wraps
it; a setting that cannot run here is an error, never a silent fallback to eager.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import PreTrainedModel

from shortened.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

LIGER_REQUIREMENT = "liger-kernel==0.8.5"  # setup.py's extras_require["gpu"]


def check_kernels(model: ModelConfig, compile_blocks: bool, device: torch.device) -> None:
    """Refuse, before anything is loaded, a kernel setting this rank cannot run."""
    if model.liger:
        _check_liger(device)
    if compile_blocks:
        _check_compiler(device)


def set_fp32_matmul_precision(device: torch.device, tf32: bool) -> None:
    """`train.tf32` on a CUDA rank: fp32 matmuls on TF32 tensor cores (an H100's dense TF32 rate is ~7x its fp32
    rate) or in full fp32. Process-wide, so it is set once, before the model is built; a CPU rank is left as it is."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing it with the old flags is an error
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"  # type: ignore[attr-defined]
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def apply_kernels(model: PreTrainedModel, config: ModelConfig, compile_blocks: bool) -> None:
    """Patch Liger's kernels into `model` and compile its blocks, in place; parameter names do not change."""
    if config.liger:
        _apply_liger(model)
    if compile_blocks:
        compile_blocks_of(model)


def compile_blocks_of(model: PreTrainedModel) -> None:
    """torch.compile each decoder block, as torchtitan does: one graph per block (the blocks share its code, so it
    compiles once), the embedding and the loss left eager. `Module.compile` compiles the block's call in place instead
    of wrapping it in an `OptimizedModule`, so the state dict gains no `_orig_mod.` and checkpoints, exports and
    resumes see the eager model's names; gradient checkpointing, DeepSpeed's gradient hooks and forward hooks on the
    model are outside the compiled region."""
    blocks = _blocks(model)
    for block in blocks:
        block.compile()
    log.info("train.compile: %d decoder blocks compiled with torch.compile (the first step compiles them)",
             len(blocks))


def _blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"train.compile=true: {type(model).__name__} has no decoder blocks at base_model.layers; "
                          "set train.compile=false")
    return layers


def _check_liger(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"model.liger=true: Liger-Kernel's Triton kernels run on CUDA GPUs only, and this rank "
                          f"trains on {device.type}; set model.liger=false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"model.liger=true: Liger-Kernel is not installed; install it with "
                          f"`pip install -e '.[gpu]'` ({LIGER_REQUIREMENT}) or set model.liger=false")


def _apply_liger(model: PreTrainedModel) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    if model.config.model_type != "llama":
        raise ConfigError(f"model.liger=true: the kernels are patched into Llama models, and this model is "
                          f"{model.config.model_type!r}; set model.liger=false")
    # Liger's fused linear cross-entropy replaces the model's forward and takes labels; the objectives compute the
    # loss from the final hidden states chunk by chunk (objective.py, distill_loss.py), which already keeps the
    # full-vocabulary logits out of memory and is where the distillation loss lives, so it stays out, as does
    # Liger's plain cross-entropy, which would act on those full logits. RoPE is patched module-wide in
    # transformers' Llama code (a teacher gets it too: the same numbers, faster); the norms and MLPs of this model.
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    log.info("Liger-Kernel: fused RMSNorm, RoPE and SwiGLU patched into the model")


def _check_compiler(device: torch.device) -> None:
    """torch.compile's inductor backend generates Triton kernels on CUDA and C++ on CPU; without the compiler it
    needs, the first step would fail deep inside a compilation, minutes after start."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile=true: torch.compile needs Triton on CUDA, and this torch cannot import "
                              "it; install the triton build that matches torch, or set train.compile=false")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ConfigError("train.compile=true: torch.compile needs a C++ compiler on CPU (g++ or clang++, or $CXX), "
                          "and none was found; install one or set train.compile=false") from None
