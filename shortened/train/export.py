"""A complete checkpoint as a Hugging Face model (safetensors + tokenizer) with the training weights' logits.

By default the weights are the ones the engine ran its forward pass with: DeepSpeed's module state in the
training dtype (under ZeRO-1/2 every rank holds it whole; in bf16 it is the rounding of the fp32 master
weights). `dtype="fp32"` on a bf16 run exports the fp32 master weights instead, gathered from the ZeRO-2
optimizer shards. No model is instantiated, so exporting a 7B checkpoint needs memory for its weights only.

A tied model (`tie_word_embeddings: true`) has one matrix under two names in both sources (`lm_head.weight` and
`model.embed_tokens.weight`); it is written once, under the name `save_pretrained` keeps, and transformers ties
the head to it on load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from shortened.modeling import tied_parameter_names
from shortened.tokenizer import TokenizerNotFound, copy_tokenizer, load_tokenizer
from shortened.train.checkpoint import (
    DEEPSPEED_TAG,
    MODEL_CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    marker_problem,
)
from shortened.train.state import TrainingState

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights in the training dtype, as the engine used them."""
    states = torch.load(checkpoint / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                        weights_only=False)  # DeepSpeed's file also pickles its config objects; our own file
    return states["module"]


def master_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights, gathered from every rank's ZeRO-2 optimizer shard (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    except ValueError as err:  # ZeRO-1 with bf16 uses DeepSpeed's BF16_Optimizer, whose shards it cannot read
        raise CheckpointError(f"{checkpoint}: cannot gather fp32 master weights ({err}); export in the training "
                              "dtype (the default) instead") from None


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write `out` as an HF model; `dtype` defaults to the precision the checkpoint was trained in."""
    path = Path(checkpoint)
    problem = marker_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: not a complete checkpoint ({problem}); only complete ones are exported")
    precision = TrainingState.read(path / STATE_FILE).precision
    dtype = dtype or precision
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    source = module_weights(path) if dtype == precision else master_weights(path)
    config_dict = json.loads((path / MODEL_CONFIG_FILE).read_text())
    hf_config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):  # shapes, names and ties only; allocates nothing
        reference = AutoModelForCausalLM.from_config(hf_config)
    _check_names(source, reference, hf_config.model_type, path)
    stored = _without_tied_aliases(source, tied_parameter_names(reference), path)
    # Own copies: gathered tensors are views of one flat buffer, which safetensors refuses to save.
    weights = {name: tensor.to(DTYPES[dtype], copy=True).contiguous() for name, tensor in stored.items()}
    hf_config.dtype = DTYPES[dtype]
    hf_config.use_cache = True  # training turned the KV cache off; generation wants it
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    save_torch_state_dict(weights, out, max_shard_size="5GB")
    _copy_tokenizer(path, out)
    return out


def _copy_tokenizer(path: Path, out: Path) -> None:
    """The checkpoint's tokenizer, as the trainer stored it (`tokenizer.copy_tokenizer`)."""
    try:
        tokenizer = load_tokenizer(path).path
    except TokenizerNotFound:
        log.warning("%s has no tokenizer.model or tokenizer.json: the export has no tokenizer", path)
        return
    copy_tokenizer(tokenizer, out)


def _check_names(weights: dict[str, torch.Tensor], model: torch.nn.Module, model_type: str, path: Path) -> None:
    reference = model.state_dict()
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    wrong = [name for name in set(reference) & set(weights) if reference[name].shape != weights[name].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit its {model_type} config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")


def _without_tied_aliases(weights: dict[str, torch.Tensor], aliases: dict[str, str], path: Path
                          ) -> dict[str, torch.Tensor]:
    """`weights` with each tied alias left out; one whose values differ from its matrix's means the checkpoint did
    not train one parameter, and its export would silently keep only one of the two."""
    differ = [alias for alias, name in aliases.items() if not torch.equal(weights[alias], weights[name])]
    if differ:
        raise CheckpointError(f"{path}: {', '.join(differ)} should be tied to {', '.join(aliases[a] for a in differ)} "
                              "(tie_word_embeddings in its model_config.json) but holds other values")
    return {name: tensor for name, tensor in weights.items() if name not in aliases}
