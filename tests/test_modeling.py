import torch

from shortened.modeling import (
    build_tiny_llama,
    param_count,
    save_with_tokenizer,
    tiny_llama_config,
    vicuna_7b_config,
)
from shortened.tokenizer import load_tokenizer


def test_tiny_llama_is_deterministic_and_uses_llama_vocab():
    a, b = build_tiny_llama(seed=3), build_tiny_llama(seed=3)
    assert a.config.vocab_size == 32_000
    ids = torch.tensor([[1, 306, 626, 2]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, build_tiny_llama(seed=4)(ids).logits)


def test_param_count_matches_the_real_module():
    config = tiny_llama_config(num_layers=3, num_kv_heads=2)
    model = build_tiny_llama(num_layers=3, num_kv_heads=2)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_vicuna_geometry_sizes():
    # 6.74B for Vicuna-7B; the published pruned sizes 5.5B / 3.7B / 2.7B / 1.5B for 26 / 17 / 12 / 6 blocks.
    sizes = {n: round(param_count(vicuna_7b_config(n)) / 1e9, 1) for n in (32, 26, 17, 12, 6)}
    assert sizes == {32: 6.7, 26: 5.5, 17: 3.7, 12: 2.7, 6: 1.5}


def test_saved_tiny_model_reloads_with_tokenizer(tmp_path, tokenizer_model):
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(seed=1)
    out = save_with_tokenizer(model, tmp_path / "m", tokenizer_model)
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 15043, 2]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert load_tokenizer(out).encode("Hello") == [15043]
