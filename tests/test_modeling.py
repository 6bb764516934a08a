import pytest
import torch

from shortened.modeling import (
    build_tiny_llama,
    param_count,
    save_with_tokenizer,
    tiny_llama_config,
    train_flops_per_token,
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


def test_mfu_flops_are_the_palm_torchtitan_count_for_the_2_7b_geometry():
    # By hand, 12 Vicuna-7B blocks at seq 2048: a block multiplies 4 x 4096^2 (q, k, v, o) + 3 x 4096 x 11008 (MLP)
    # and scales by 2 x 4096 norm weights; 12 blocks + LM head 32000 x 4096 + final norm = 2,559,676,416 parameters
    # that multiply an activation (the untied embedding is only looked up). Attention 12 x L x H x Q x T.
    block = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    n = 12 * block + 32_000 * 4096 + 4096
    attention = 12 * 12 * 32 * 128 * 2048
    assert n == 2_559_676_416 and attention == 1_207_959_552
    flops = train_flops_per_token(vicuna_7b_config(12), 2048)
    assert flops == 6 * n + attention
    assert round(flops / 1e9, 2) == 16.57


def test_a_grouped_query_model_counts_attention_per_query_head():
    config = tiny_llama_config(num_layers=3, num_heads=4, num_kv_heads=2)
    mha = tiny_llama_config(num_layers=3, num_heads=4, num_kv_heads=4)
    # The key/value projections shrink (6N drops); the score and value products do not: 12 x L x H x Q x T both.
    assert (train_flops_per_token(mha, 128) - train_flops_per_token(config, 128)
            == 6 * 3 * 2 * 64 * (64 - 32))
    assert train_flops_per_token(config, 256) - train_flops_per_token(config, 128) == 12 * 3 * 4 * 16 * 128


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 NVL MIG 1g.12gb", None),
])
def test_the_peak_is_looked_up_by_the_exact_device_name(monkeypatch, name, tflops):
    from shortened.train import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = metrics.peak_flops(torch.device("cuda", 0), 0.0)
    assert peak == (tflops * 1e12 if tflops else None)
    assert metrics.peak_flops(torch.device("cuda", 0), 500.0) == 500e12  # log.peak_tflops wins
