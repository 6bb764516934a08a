"""Loading and saving the Hugging Face models that pruning and LoRA read and write, with their tokenizer files."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.model_dir import resolve_model_dir as resolve_checked
from shortened.prune.blocks import block_param_counts, check_supported
from shortened.tokenizer import copy_tokenizer, copy_tokenizer_sidecars

if TYPE_CHECKING:  # transformers is imported lazily: the CLIs answer --help and bad arguments without it
    from transformers import PreTrainedModel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on CPU, where bf16 matmuls are slow and gain nothing."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_dir(model: str) -> Path:
    """--model: a local directory, or a hub id from the local cache (nothing is downloaded at run time), checked
    loadable (`shortened.model_dir`)."""
    return resolve_checked(model, "--model")


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (float32 when the config does not say)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def model_shape(model_dir: Path) -> tuple[int, int, int]:
    """(blocks, all parameters, parameters of the first block) from config.json alone: a model built on the meta
    device holds no weights, so a bad block count is refused before minutes of loading a 7B checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    check_supported(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    blocks = block_param_counts(skeleton)
    return len(blocks), sum(p.numel() for p in skeleton.parameters()), blocks[0]


def load_causal_lm(model_dir: Path, dtype: torch.dtype | str, device: torch.device) -> PreTrainedModel:
    """Load a Llama-layout causal LM; the architecture is checked from config.json before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_supported(AutoConfig.from_pretrained(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)  # transformers' .to() is mistyped
    return model.to(device).eval()


def save_model_dir(model: PreTrainedModel, out_dir: str | Path, tokenizer_source: Path) -> Path:
    """`save_pretrained` (safetensors) plus the tokenizer files of `tokenizer_source` (a file or a directory)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_source.is_file():
        copy_tokenizer(tokenizer_source, out)
        return out
    for name in ("tokenizer.model", "tokenizer.json"):  # both where both exist: ours reads one, AutoTokenizer the other
        if (tokenizer_source / name).is_file():
            shutil.copyfile(tokenizer_source / name, out / name)
    copy_tokenizer_sidecars(tokenizer_source, out)
    return out
