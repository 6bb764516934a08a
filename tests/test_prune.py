"""Depth pruning on real tiny Llama models, real calibration text and the real LLaMA tokenizer.

The test model (tests/prune_fixtures.py) has blocks 2 and 3 made exact identities and is trained until every
other block matters on the calibration windows.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig, Qwen2Config

from shortened.config import ConfigError, PruneConfig, from_dict
from shortened.modeling import block_param_count, build_tiny_llama, param_count, save_with_tokenizer, vicuna_7b_config
from shortened.prune.blocks import UnsupportedModelError, remove_blocks, skip_blocks
from shortened.prune.budget import blocks_for_ratio, blocks_to_remove
from shortened.prune.calibration import calibration_windows
from shortened.prune.importance import CRITERIA, SCORERS, perplexity
from shortened.prune.pruner import prune
from shortened.prune.selection import select_blocks
from shortened.tokenizer import load_tokenizer

import warm_start
from conftest import ROOT, subprocess_env
from prune_fixtures import CALIB, CALIB_LEN, CALIB_SAMPLES, IDENTITY, NUM_LAYERS

FP32 = torch.float32


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=FP32).eval()


def skip_by_hooks(model, blocks):
    """Make blocks pass their input through, by a mechanism independent of the code under test."""
    def passthrough(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    return [model.model.layers[b].register_forward_hook(passthrough, with_kwargs=True) for b in blocks]


def prune_config(model_dir, out, **overrides) -> PruneConfig:
    values = dict(model=str(model_dir), out=str(out), calib=str(CALIB), calib_samples=CALIB_SAMPLES,
                  calib_len=CALIB_LEN, remove=2, protect_first=0, protect_last=0)
    values.update(overrides)
    return from_dict(PruneConfig, values)


# ------------------------------------------------------------------------ the criteria rank and remove the right blocks


@pytest.mark.parametrize("criterion", CRITERIA)
def test_identity_blocks_rank_least_important_and_are_removed(criterion, model_dir, tmp_path):
    report = prune(prune_config(model_dir, tmp_path / "out", criterion=criterion))
    scores = report["scores"]
    assert report["removed_blocks"] == IDENTITY
    if criterion == "angular":  # one distance per start of a run of 2; the run 2..3 is the identity
        assert scores[2] < min(s for i, s in enumerate(scores) if i != 2 and s is not None)
    else:
        assert max(scores[i] for i in IDENTITY) < min(s for i, s in enumerate(scores) if i not in IDENTITY)
    pruned = load(tmp_path / "out")
    assert pruned.config.num_hidden_layers == NUM_LAYERS - 2
    # Removing exact identities changes nothing: the calibration perplexity is the same number.
    assert report["calib_ppl_after"] == pytest.approx(report["calib_ppl_before"], rel=1e-6)


def test_prune_calibrates_on_real_token_shards(model_dir, sample_shards, tmp_path):
    report = prune(prune_config(model_dir, tmp_path / "out", criterion="bi", calib=str(sample_shards),
                                calib_samples=10, calib_len=128))
    assert report["removed_blocks"] == IDENTITY  # an identity is an identity on any text
    assert report["calibration"]["path"] == str(sample_shards) and report["calibration"]["length"] == 128


@pytest.mark.parametrize("criterion", ["ppl", "magnitude", "bi", "angular"])
def test_iterative_removes_identity_blocks_first_and_rescores(criterion, model_dir, windows):
    model = load(model_dir)
    selection = select_blocks(model, windows, criterion, 2, protect_first=0, protect_last=0, iterative=True,
                              batch_size=10, dtype=FP32)
    assert sorted(selection.removed) == IDENTITY
    first, second = selection.rounds
    assert sorted(first["scores"]) == list(range(NUM_LAYERS))
    assert sorted(second["scores"]) == [b for b in range(NUM_LAYERS) if b != first["removed"]]
    assert len(model.model.layers) == NUM_LAYERS  # scoring skipped blocks without removing them


def test_iterative_taylor_is_refused(model_dir, windows):
    with pytest.raises(ValueError, match="iterative"):
        select_blocks(load(model_dir), windows, "taylor", 1, protect_first=0, protect_last=0, iterative=True,
                      batch_size=10, dtype=FP32)
    with pytest.raises(ConfigError, match="iterative"):
        prune_config(model_dir, "x", criterion="taylor", iterative=True)


def test_protected_blocks_are_never_removed(model_dir, windows):
    model = load(model_dir)
    selection = select_blocks(model, windows, "bi", 2, protect_first=3, protect_last=0, iterative=False,
                              batch_size=10, dtype=FP32)
    # Block 2 is an identity but protected: the two lowest of the candidates 3..5 go instead.
    assert selection.removed == sorted(range(3, NUM_LAYERS), key=lambda b: selection.scores[b])[:2]
    with pytest.raises(ValueError, match="--protect-first 4, --protect-last 2"):
        select_blocks(model, windows, "bi", 1, protect_first=4, protect_last=2, iterative=False,
                      batch_size=10, dtype=FP32)


# ------------------------------------------------------------------------ the pruned model: reload, generation, layouts


def test_pruned_model_reloads_generates_and_equals_the_original_with_blocks_skipped(model_dir, tmp_path, windows):
    # Protecting the last 3 blocks leaves 0..2: magnitude takes identity block 2 and real block 1, so the kept
    # blocks 3..5 are renumbered and the output really changes.
    report = prune(prune_config(model_dir, tmp_path / "out", criterion="magnitude", protect_last=3))
    assert report["removed_blocks"] == [1, 2]
    pruned = load(tmp_path / "out")
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    assert load_tokenizer(tmp_path / "out").sha256 == load_tokenizer(model_dir).sha256

    original = load(model_dir)
    with torch.no_grad():
        full = original(windows).logits
        handles = skip_by_hooks(original, report["removed_blocks"])
        skipped = original(windows).logits
        expected_tokens = original.generate(windows[:2, :16], max_new_tokens=12, do_sample=False)
        for handle in handles:
            handle.remove()
        logits = pruned(windows).logits
        again = load(tmp_path / "out")(windows).logits
    assert torch.equal(logits, again)
    assert torch.equal(logits, skipped)
    assert not torch.allclose(logits, full, atol=1e-3)

    prompt = windows[:2, :16]
    cached = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected_tokens)


def test_skip_blocks_restores_the_model(model_dir, windows):
    model = load(model_dir)
    layers = list(model.model.layers)
    with torch.no_grad():
        before = model(windows[:1]).logits
        with skip_blocks(model, [0, 4]):
            assert model.config.num_hidden_layers == NUM_LAYERS - 2
        after = model(windows[:1]).logits
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == NUM_LAYERS
    assert torch.equal(before, after)


def small_config(family: str):
    shape = dict(vocab_size=32_000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    if family == "qwen2":  # alternating full / sliding-window attention, listed per layer in layer_types
        return Qwen2Config(**shape, use_sliding_window=True, max_window_layers=2,
                           layer_types=["full_attention", "sliding_attention"] * 2)
    return MistralConfig(**shape)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_layout_families_prune_with_working_kv_cache(family, tmp_path, tokenizer_model):
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(small_config(family)).eval()
    original.save_pretrained(tmp_path / family)  # no tokenizer in the directory: --tokenizer supplies it
    report = prune(prune_config(tmp_path / family, tmp_path / "out", criterion="magnitude", remove=1,
                                protect_first=1, protect_last=2, tokenizer=str(tokenizer_model)))
    assert report["removed_blocks"] == [1]
    pruned = load(tmp_path / "out")
    assert pruned.config.model_type == family and pruned.config.num_hidden_layers == 3
    if family == "qwen2":
        assert pruned.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    ids = torch.randint(3, 32_000, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        skip_by_hooks(original, [1])
        assert torch.allclose(pruned(ids).logits, original(ids).logits, atol=1e-5)
    cached = pruned.generate(ids[:, :12], max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(cached, pruned.generate(ids[:, :12], max_new_tokens=10, do_sample=False, use_cache=False))
    assert load_tokenizer(tmp_path / "out").sha256 == load_tokenizer(tokenizer_model).sha256


def test_unsupported_architecture_is_a_clear_error(tmp_path, tokenizer_model):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32_000, n_embd=64, n_layer=2, n_head=4, n_positions=256))
    save_with_tokenizer(gpt2, tmp_path / "gpt2", tokenizer_model)
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*Llama block layout"):
        prune(prune_config(tmp_path / "gpt2", tmp_path / "out", remove=1))
    assert not (tmp_path / "out").exists()


def test_pruning_refuses_to_overwrite_its_source(model_dir):
    with pytest.raises(ValueError, match="would overwrite"):
        prune(prune_config(model_dir, model_dir))


def test_remove_blocks_refuses_bad_indices():
    model = build_tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(model, [3])
    with pytest.raises(ValueError, match="every block"):
        remove_blocks(model, [0, 1, 2])


# ------------------------------------------------------------------- determinism, batch size, Taylor+ at bounded memory


@pytest.mark.parametrize("criterion", ["taylor", "ppl"])
def test_same_seed_same_calibration_same_scores_and_choice(criterion, model_dir, tokenizer_model):
    tokenizer = load_tokenizer(tokenizer_model)
    runs = []
    for _ in range(2):  # everything fresh: calibration drawn again, model loaded again
        windows = calibration_windows(CALIB, tokenizer, CALIB_SAMPLES, CALIB_LEN, 1234)
        runs.append((windows, select_blocks(load(model_dir), windows, criterion, 2, protect_first=0,
                                            protect_last=0, iterative=False, batch_size=5, dtype=FP32)))
    (windows_a, a), (windows_b, b) = runs
    assert torch.equal(windows_a, windows_b) and a.scores == b.scores and a.removed == b.removed
    assert not torch.equal(windows_a, calibration_windows(CALIB, tokenizer, CALIB_SAMPLES, CALIB_LEN, 7))


def test_batch_size_does_not_change_perplexity_or_taylor(model_dir, windows):
    model = load(model_dir)
    assert perplexity(model, windows, 3, FP32) == pytest.approx(perplexity(model, windows, 10, FP32), rel=1e-6)
    small, whole = SCORERS["taylor"](model, windows, 3, FP32), SCORERS["taylor"](model, windows, 10, FP32)
    assert small == pytest.approx(whole, rel=1e-4)


def all_blocks_at_once_taylor(model, windows, batch_size):
    """The reference: every block's weights require grad at once, in fp32, and their .grad sums all batches."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = list(model.model.layers)
    for block in blocks:
        block.requires_grad_(True)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        (loss / tokens).backward()
    return [sum((p.double() * p.grad.double()).abs().sum().item() for p in block.parameters()) for block in blocks]


def test_taylor_block_by_block_equals_all_blocks_at_once(model_dir, windows):
    reference = all_blocks_at_once_taylor(load(model_dir), windows, 5)
    model = load(model_dir)
    assert SCORERS["taylor"](model, windows, 5, FP32) == pytest.approx(reference, rel=1e-6)
    # Three blocks: the two identities and the real block that the scores rank next.
    selection = select_blocks(model, windows, "taylor", 3, protect_first=0, protect_last=0, iterative=False,
                              batch_size=5, dtype=FP32)
    assert sorted(selection.removed) == sorted(sorted(range(NUM_LAYERS), key=lambda b: (reference[b], b))[:3])


def test_taylor_leaves_a_bf16_model_exactly_as_it_was(model_dir, windows):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model.lm_head.requires_grad_(False)  # a mix of flags: each must come back as it was
    params = {name: (p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    windows = windows[:4]  # bf16 matmuls are slow on CPU
    with pytest.raises(ValueError, match="float32"):  # a bf16 model cannot compute in fp32 without autocast
        SCORERS["taylor"](model, windows, 2, FP32)
    scores = SCORERS["taylor"](model, windows, 2, torch.bfloat16)
    assert dict(model.named_parameters()).keys() == params.keys()
    for name, p in model.named_parameters():
        original, value, requires_grad = params[name]
        assert p is original and p.dtype == torch.bfloat16 and p.requires_grad == requires_grad and p.grad is None
        assert torch.equal(p, value), name
    assert all(torch.equal(b, buffers[name]) and b.dtype == buffers[name].dtype for name, b in model.named_buffers())
    assert [scores[i] for i in IDENTITY] == [0.0, 0.0]
    assert min(s for i, s in enumerate(scores) if i not in IDENTITY) > 0


def test_taylor_pipeline_scores_in_bf16_and_saves_the_stored_dtype(model_dir, tmp_path):
    report = prune(prune_config(model_dir, tmp_path / "out", criterion="taylor", dtype="bfloat16", calib_samples=4))
    assert report["removed_blocks"] == IDENTITY and report["dtype"] == "bfloat16"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in saved.parameters()} == {FP32}


def test_vicuna_ratio_to_block_count_table():
    config = vicuna_7b_config()
    total, block = param_count(config), block_param_count(config)
    kept = {ratio: 32 - blocks_for_ratio(ratio, total, block) for ratio in (0.20, 0.45, 0.60, 0.80)}
    assert kept == {0.20: 26, 0.45: 17, 0.60: 12, 0.80: 6}
    sizes = {n: round(param_count(vicuna_7b_config(n)) / 1e9, 1) for n in kept.values()}
    assert sizes == {26: 5.5, 17: 3.7, 12: 2.7, 6: 1.5}
    assert blocks_to_remove(32, total, block, keep=26) == 6
    with pytest.raises(ConfigError, match="exactly one"):  # checked once, by the config every caller builds
        from_dict(PruneConfig, {"model": "m", "out": "o", "calib": "c", "remove": 3, "ratio": 0.2})
    with pytest.raises(ValueError, match="at least one must go"):
        blocks_to_remove(32, total, block, ratio=0.001)


# ------------------------------------------------------------------------------------------ the command line


def test_launch_prune_writes_model_and_full_report(model_dir, tmp_path):
    out = tmp_path / "pruned"
    # 2% of the parameters of this tiny model (2 x 32k x 64 embeddings and head, 6 blocks of 50,304) is 2 blocks.
    cmd = [ROOT / "launch" / "prune.py", "--model", str(model_dir), "--criterion", "taylor",
           "--ratio", "0.02", "--calib", str(CALIB), "--calib-samples", str(CALIB_SAMPLES),
           "--calib-len", str(CALIB_LEN), "--out", str(out), "--protect-first", "1", "--protect-last", "1"]
    result = warm_start.run(cmd, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "prune_report.json").read_text())
    model = load(model_dir)
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert report["removed_blocks"] == IDENTITY and report["kept_blocks"] == [0, 1, 4, 5]
    assert len(report["scores"]) == NUM_LAYERS and report["scores"][2] == 0.0
    assert report["params_before"] == sum(p.numel() for p in model.parameters())
    assert report["params_after"] == sum(p.numel() for p in load(out).parameters())
    assert report["params_before"] - report["params_after"] == blocks[2] + blocks[3]
    assert report["calib_ppl_before"] > 1 and report["calib_ppl_after"] == pytest.approx(report["calib_ppl_before"])
    assert (report["criterion"], report["seed"], report["protect_first"]) == ("taylor", 1234, 1)
    assert "--ratio 0.02" in report["command"] and "launch/prune.py" in report["command"]
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors").is_file()


def test_launch_prune_reports_bad_arguments(model_dir, tmp_path):
    cmd = [ROOT / "launch" / "prune.py", "--model", model_dir, "--ratio", "1.5", "--calib", CALIB, "--out",
           tmp_path / "o"]
    result = warm_start.run(cmd, env=subprocess_env(), timeout=120)
    assert result.returncode == 2 and "prune.ratio" in result.stderr
