"""Whole decoder blocks of a Llama-layout Hugging Face model: check the layout, skip blocks, remove blocks.

Skipping swaps the model's `layers` ModuleList for a shorter one holding the same modules, so scoring one
block's removal copies no weights. Removal does the same permanently and then renumbers each kept attention's
`layer_idx` (the KV cache is indexed by it) and trims the per-layer config lists.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from torch import nn

from shortened.prune.errors import PruneInputError

# Architectures whose decoder block is exactly Llama's: pre-norm attention + gated MLP on a residual stream,
# layers in `model.model.layers`. Others may look alike and differ (parallel blocks, MoE, cross-layer KV), so
# they are refused rather than pruned into a wrong model.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# A transformers *ForCausalLM. Its `model.layers` and `config` are attributes that nn.Module's typing (every unknown
# attribute a Tensor or Module) cannot describe.
CausalLM = Any
_BLOCK_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)
# Config attributes holding one entry per layer; they must shrink with the layers.
_PER_LAYER_CONFIG_KEYS = ("layer_types",)


class UnsupportedModelError(PruneInputError):
    """The model's architecture is not a Llama-layout decoder this package can prune."""


def check_supported(config) -> None:
    """Refuse, before any weight is loaded, a config whose architecture is not a Llama-layout decoder."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {getattr(config, 'architectures', None)}) is not supported: "
            f"depth pruning handles the Llama block layout only ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def decoder_layers(model: CausalLM) -> nn.ModuleList:
    """The decoder blocks of a causal LM, after checking each has the Llama block layout."""
    check_supported(model.config)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers ModuleList to prune")
    for index, layer in enumerate(layers):
        for name in _BLOCK_MODULES:
            try:
                layer.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(f"block {index} of {type(model).__name__} lacks {name}") from None
    return layers


def block_param_counts(model: CausalLM) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]


def _set_layers(model: CausalLM, layers: Sequence[nn.Module]) -> None:
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)


@contextlib.contextmanager
def skip_blocks(model: CausalLM, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` as if the blocks `removed` (current indices) were gone; everything is restored on exit.

    Only meant for cache-less forward passes (scoring): `layer_idx` is left as is, so do not use a KV cache here.
    """
    original = decoder_layers(model)
    removed_set = _checked_indices(removed, len(original))
    kept = [i for i in range(len(original)) if i not in removed_set]
    saved = {key: getattr(model.config, key) for key in _PER_LAYER_CONFIG_KEYS if _is_per_layer(model.config, key)}
    num_layers = model.config.num_hidden_layers
    _set_layers(model, [original[i] for i in kept])
    for key, values in saved.items():
        setattr(model.config, key, [values[i] for i in kept])
    try:
        yield model
    finally:
        model.model.layers = original
        model.config.num_hidden_layers = num_layers
        for key, values in saved.items():
            setattr(model.config, key, values)


def remove_blocks(model: CausalLM, removed: Sequence[int]) -> nn.Module:
    """Delete blocks `removed` in place: layers, per-layer config lists and attention `layer_idx` renumbered."""
    layers = decoder_layers(model)
    removed_set = _checked_indices(removed, len(layers))
    kept = [i for i in range(len(layers)) if i not in removed_set]
    if not kept:
        raise ValueError("cannot remove every block of the model")
    for key in _PER_LAYER_CONFIG_KEYS:
        if _is_per_layer(model.config, key):
            setattr(model.config, key, [getattr(model.config, key)[i] for i in kept])
    _set_layers(model, [layers[i] for i in kept])
    for new_index, layer in enumerate(model.model.layers):
        # DynamicCache stores keys/values by layer_idx; stale indices would read past the cache or mix layers.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return model


def _is_per_layer(config, key: str) -> bool:
    values = getattr(config, key, None)
    return isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers


def _checked_indices(indices: Sequence[int], num_layers: int) -> set[int]:
    chosen = set(int(i) for i in indices)
    if len(chosen) != len(indices):
        raise ValueError(f"block indices repeat: {sorted(indices)}")
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"block indices {sorted(bad)} out of range for a model with {num_layers} blocks")
    return chosen

