"""Model geometry helpers: the tiny Llama used by tests and the demo, Vicuna-7B's shape, parameter and FLOP counts.

Models are plain Hugging Face `transformers` Llama models; nothing here forks the architecture.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from shortened.tokenizer import copy_tokenizer

LLAMA_VOCAB_SIZE = 32_000  # the LLaMA / Vicuna SentencePiece vocabulary


def tiny_llama_config(
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 176,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    vocab_size: int = LLAMA_VOCAB_SIZE,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10_000.0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """A Llama config with the real 32k vocabulary and a few narrow layers: runs in milliseconds on CPU.

    `num_kv_heads < num_heads`, a larger vocabulary, `rope_theta=500_000` and the tokenizer's own bos/eos ids give
    the Llama-3 layout (grouped-query attention, untied head), as `tiny_llama3_config` does;
    `tie_word_embeddings=True` SmolLM2's (`tiny_smollm_config`).
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_llama3_config(vocab_size: int, bos_token_id: int, eos_token_id: int, num_layers: int = 4) -> LlamaConfig:
    """Llama-3's layout in miniature: 4 query heads sharing 2 key/value heads, rope_theta 500k, untied head."""
    return tiny_llama_config(num_layers=num_layers, num_heads=4, num_kv_heads=2, vocab_size=vocab_size,
                             rope_theta=500_000.0, bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def tiny_smollm_config(num_layers: int = 4) -> LlamaConfig:
    """SmolLM2's layout in miniature: 6 query heads sharing 2 key/value heads (3 per group, as SmolLM2-135M's 9 share
    3), rope_theta 100k, and the LM head tied to the input embedding (one matrix); the real 32k LLaMA vocabulary."""
    return tiny_llama_config(num_layers=num_layers, hidden_size=96, intermediate_size=256, num_heads=6,
                             num_kv_heads=2, rope_theta=100_000.0, tie_word_embeddings=True)


def build_tiny_llama(seed: int = 0, config: LlamaConfig | None = None, **config_kwargs) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (`config`, else `tiny_llama_config(**config_kwargs)`); the same seed gives
    the same weights."""
    config = config or tiny_llama_config(**config_kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)  # building a test model must not disturb the caller's RNG
    return model.eval()


def vicuna_7b_config(num_layers: int = 32) -> LlamaConfig:
    """Vicuna-7B-v1.3 geometry (LLaMA-7B), optionally with fewer blocks (the pruned 5.5B/3.7B/2.7B/1.5B)."""
    return LlamaConfig(
        vocab_size=LLAMA_VOCAB_SIZE,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def block_param_count(config: LlamaConfig) -> int:
    """Parameters of one decoder block: attention, MLP and the two RMSNorm weights."""
    h = config.hidden_size
    q_out = config.num_attention_heads * head_dim(config)
    kv_out = (config.num_key_value_heads or config.num_attention_heads) * head_dim(config)
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if getattr(config, "attention_bias", False):
        attention += q_out + 2 * kv_out + h
    mlp = 3 * h * config.intermediate_size
    return attention + mlp + 2 * h


def non_block_param_count(config: LlamaConfig) -> int:
    """Embedding, final norm and LM head (counted once when tied)."""
    embed = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embed
    return embed + head + config.hidden_size


def param_count(config: LlamaConfig) -> int:
    return non_block_param_count(config) + config.num_hidden_layers * block_param_count(config)


def train_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward) in the PaLM / torchtitan MFU convention.

    6 * N for the matrix multiplies of every parameter that multiplies an activation (the embedding lookup
    does not; the LM head does, tied to the embedding or not), plus 12 * layers * heads * head_dim * seq_len for
    attention: QK^T and AV are each 2 * heads * head_dim * seq_len FLOPs per token forward, times 3 for forward
    + backward. Causal masking is not discounted (PaLM's appendix B, torchtitan), so the figure compares with
    theirs; activation recomputation is not counted: MFU, not HFU. A tied model has the FLOPs of its untied twin:
    one matrix fewer, the same multiplies. With grouped-query attention the term counts query heads: every query
    head scores every key.
    """
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim(config) * seq_len
    return 6 * matmul_param_count(config) + attention


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def matmul_param_count(config: LlamaConfig) -> int:
    """The parameters that multiply an activation: all but an untied input embedding, which is only looked up (a
    tied one is also the LM head's matrix)."""
    lookup_only = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return param_count(config) - lookup_only


def tied_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter name that refers to the same tensor as an earlier one, mapped to that first name: a tied LM
    head gives {"lm_head.weight": "model.embed_tokens.weight"}, the name `save_pretrained` keeps; {} when nothing is
    tied. Read from the model (built from its config, on the meta device if only the names matter), never assumed."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def save_with_tokenizer(model: PreTrainedModel, out_dir: str | Path, tokenizer_file: str | Path) -> Path:
    """`save_pretrained` (safetensors) plus the tokenizer beside it (`copy_tokenizer`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tokenizer_file, out)
    return out
