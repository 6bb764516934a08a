"""Tied input/output embeddings (`tie_word_embeddings: true`, as SmolLM2 has) through the whole system, on a tiny
Llama of SmolLM2's layout (`tiny_smollm_config`: 3 query heads per key/value head, one matrix for the embedding
and the LM head) with the real LLaMA tokenizer and the shared sample packed by source: pruning through
launch/prune.py, 2-rank CPT under ZeRO-2 stopped and resumed, export from the module weights and from the fp32
masters, LoRA through launch/lora.py, and distillation from the unpruned model with dynamic batch loading measured
against it. At every stage the matrix is one parameter (`lm_head.weight is model.embed_tokens.weight`), stored once,
counted once, and the numbers (losses, logits) are those of transformers' own tied model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from test_lora import conversations
from test_prune import skip_by_hooks
from transformers import AutoModelForCausalLM

from shortened.data.mixture import SourceIndex
from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.shards import PackedShards
from shortened.modeling import (
    build_tiny_llama,
    param_count,
    save_with_tokenizer,
    tiny_smollm_config,
    train_flops_per_token,
)
from shortened.prune.hf_model import model_shape
from shortened.train import checkpoint as ckpt
from shortened.train.cli import export_main
from shortened.train.dynamic import REFERENCE_FILE
from shortened.train.export import master_weights

import warm_start
from conftest import ROOT, launcher, subprocess_env
from train_support import PRECISION, SEQ, close, overrides, python, read_log, run_ok, same, warm

pytestmark = pytest.mark.timeout(600)
STRAIGHT, HALF = 8, 4
KD_STEPS, KD_EVERY = 4, 2  # dynamic loading's updates after steps 2 and 4
DISTILL = ("distill.kd_weight=1.0", "distill.ce_weight=0.5", "distill.temperature=2.0", "distill.chunk_size=48")


def is_tied(model) -> bool:
    return model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def stored_names(model_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            names.update(handle.keys())
    return names


def load(model_dir: Path, dtype: torch.dtype | str = torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tied")


@pytest.fixture(scope="module")
def by_source(work, slimpajama_sample, tokenizer_model) -> dict[str, Path]:
    """The shared sample's train and validation splits as 64-token shards packed by source (dynamic loading needs
    them; the plain runs read them in the global order)."""
    for split in ("train", "validation"):
        prepare_shards(PrepareConfig(input=str(slimpajama_sample), split=split, tokenizer=str(tokenizer_model),
                                     output=str(work / split), seq_len=SEQ, workers=2, pack_by_source=True,
                                     progress=False, verbose=False))
    return {"train": work / "train", "validation": work / "validation"}


@pytest.fixture(scope="module")
def source(work, tokenizer_model) -> Path:
    return save_with_tokenizer(build_tiny_llama(seed=0, config=tiny_smollm_config()), work / "source",
                               tokenizer_model)


@pytest.fixture(scope="module")
def pruned(work, source, slimpajama_sample) -> Path:
    """2 of the 4 blocks removed by the ppl criterion through launch/prune.py, as users prune."""
    out = work / "pruned"
    result = warm_start.run([ROOT / "launch/prune.py", "--model", source, "--out", out, "--criterion", "ppl",
                             "--calib", slimpajama_sample / "validation", "--calib-samples", "4", "--calib-len", "32",
                             "--remove", "2", "--no-protect"], env=subprocess_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def windows(shards: Path, indices=(0, 17, 123)) -> torch.Tensor:
    data = PackedShards(shards)
    return torch.from_numpy(np.stack([data[i] for i in indices]).astype(np.int64))


# ---------------------------------------------------------------------------------------------- counts, pruning


def test_parameter_and_flop_counts_take_the_tied_matrix_once(source):
    config = tiny_smollm_config()
    model = build_tiny_llama(seed=0, config=config)
    assert is_tied(model) and config.num_attention_heads == 3 * config.num_key_value_heads
    matrix = config.vocab_size * config.hidden_size
    assert sum(p.numel() for p in model.parameters()) == param_count(config) == model_shape(source)[1]
    untied = tiny_smollm_config()
    untied.tie_word_embeddings = False
    assert param_count(untied) == param_count(config) + matrix
    # The tied matrix is looked up and multiplied at the head; the untied twin's extra matrix is only looked up.
    assert train_flops_per_token(config, SEQ) == train_flops_per_token(untied, SEQ)
    assert train_flops_per_token(config, SEQ) == 6 * param_count(config) + 12 * config.num_hidden_layers * SEQ * 96


def test_the_pruned_model_is_saved_tied_and_equals_the_source_with_its_blocks_skipped(pruned, source, by_source):
    report = json.loads((pruned / "prune_report.json").read_text())
    model, original = load(pruned), load(source)
    assert is_tied(model) and model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert json.loads((pruned / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in stored_names(pruned)  # the matrix is stored once, under the embedding's name
    assert (report["params_before"], report["params_after"]) == (param_count(original.config),
                                                                 param_count(model.config))
    skip_by_hooks(original, report["removed_blocks"])
    ids = windows(by_source["train"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- CPT, export


@pytest.fixture(scope="module")
def cpt_runs(work, by_source, pruned) -> tuple[Path, Path]:
    """The pruned model trained 8 steps straight, and 4 steps then resumed to 8 in new processes, 2 ranks."""
    straight, resumed = work / "cpt_straight", work / "cpt_resumed"
    run_ok(warm(2, overrides(straight, by_source["train"], pruned, f"train.max_steps={STRAIGHT}"),
                work / "straight.out"))
    run_ok(warm(2, overrides(resumed, by_source["train"], pruned, f"train.max_steps={HALF}"), work / "half.out"))
    output = run_ok(warm(2, overrides(resumed, by_source["train"], pruned, f"train.max_steps={STRAIGHT}"),
                         work / "resume.out"))
    assert "resuming from" in output
    return straight, resumed


@pytest.fixture(scope="module")
def final_checkpoint(cpt_runs) -> Path:
    return ckpt.checkpoints_root(cpt_runs[1]) / ckpt.tag_for(STRAIGHT)


def test_cpt_resume_on_2_ranks_is_bitwise_the_straight_run(cpt_runs):
    straight, resumed = (read_log(run) for run in cpt_runs)
    assert [r["step"] for r in resumed] == list(range(1, STRAIGHT + 1))
    for a, b in zip(resumed, straight, strict=True):
        assert same(a, b), (a, b)


def test_a_resume_on_1_rank_repartitions_the_tied_matrix(work, cpt_runs, by_source, pruned):
    """The 2-rank step-4 checkpoint continued on 1 rank goes through DeepSpeed's universal format, parameter by
    parameter: the one matrix and its Adam moments carry over, and the losses are the 2-rank run's (up to the fp32
    rounding of another reduction order)."""
    run_dir = work / "one_rank"
    step4 = ckpt.checkpoints_root(cpt_runs[0]) / ckpt.tag_for(HALF)
    output = run_ok(python(overrides(run_dir, by_source["train"], pruned, f"train.max_steps={STRAIGHT}",
                                     f"resume={step4}"), work / "one_rank.out"))
    assert "re-partitioned from 2" in output
    reference = {r["step"]: r for r in read_log(cpt_runs[0])}
    resumed = read_log(run_dir)
    assert [r["step"] for r in resumed] == list(range(HALF + 1, STRAIGHT + 1))
    for record in resumed:
        assert close(record, reference[record["step"]], rel=1e-4), (record, reference[record["step"]])
    assert is_tied(load(ckpt.checkpoints_root(run_dir) / ckpt.tag_for(STRAIGHT) / ckpt.HF_DIR))


def test_zero2_holds_one_master_and_one_optimizer_state_for_the_tied_matrix(final_checkpoint, pruned):
    """Each rank's optimizer shard holds fp32 masters and two Adam moments: 3 x the parameters with the tied
    matrix counted once (an untied copy would add 3 x 3.07M)."""
    elements = sum(t.numel() for path in sorted((final_checkpoint / ckpt.DEEPSPEED_TAG).glob("*optim_states.pt"))
                   for t in tensors(torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]))
    params = param_count(load(pruned).config)
    assert 3 * params <= elements < 3 * params + 1000  # (+ step counters)
    masters = master_weights(final_checkpoint)
    assert torch.equal(masters["lm_head.weight"], masters["model.embed_tokens.weight"])
    assert is_tied(load(final_checkpoint / ckpt.HF_DIR, "auto"))  # the checkpoint's own model/ copy


def tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


@pytest.fixture(scope="module")
def exported(work, final_checkpoint) -> dict[str, Path]:
    """The final checkpoint exported in its training precision (the default) and as the fp32 masters."""
    outs = {"default": work / "exported", "fp32": work / "exported_fp32"}
    assert export_main(["--checkpoint", str(final_checkpoint), "--out", str(outs["default"])]) == 0
    assert export_main(["--checkpoint", str(final_checkpoint), "--out", str(outs["fp32"]), "--dtype", "fp32"]) == 0
    return outs


@pytest.mark.parametrize("kind", ["default", "fp32"])
def test_the_export_is_tied_and_gives_the_logits_of_the_master_weights(kind, exported, final_checkpoint, pruned,
                                                                       by_source):
    dtype = torch.float32 if kind == "fp32" or PRECISION == "fp32" else torch.bfloat16
    model = load(exported[kind], "auto")
    assert is_tied(model) and next(model.parameters()).dtype == dtype
    assert json.loads((exported[kind] / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in stored_names(exported[kind])
    masters = master_weights(final_checkpoint)
    reference = load(pruned, dtype)  # stock transformers' tied model given the masters, rounded as the optimizer does
    untrained = reference.model.embed_tokens.weight.clone()
    reference.load_state_dict({name: tensor.to(dtype) for name, tensor in masters.items()})
    assert is_tied(reference) and not torch.equal(reference.lm_head.weight, untrained)  # training moved the matrix
    ids = windows(by_source["train"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_on_the_tied_model_merges_into_a_tied_model_with_the_adapters_logits(work, exported, by_source):
    """PEFT's default targets (the projections) leave the tied matrix alone: the merged model keeps it as it was,
    one parameter, and computes what the adapter model computes."""
    base = exported["fp32"]
    chats = work / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in conversations(8)))
    out = work / "lora"
    assert launcher("launch/lora.py").main(
        ["--model", str(base), "--data", str(chats), "--out", str(out), "--epochs", "2", "--micro-batch-size", "2",
         "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1", "--cutoff-len", "128", "--device", "cpu",
         "--dtype", "float32"]) == 0
    merged = load(out / "merged")
    start = load(base)
    assert is_tied(merged) and "lm_head.weight" not in stored_names(out / "merged")
    assert torch.equal(merged.model.embed_tokens.weight, start.model.embed_tokens.weight.half().float())
    adapter = PeftModel.from_pretrained(start, sorted((out / "checkpoints").glob("step_*"))[-1]).eval()
    ids = windows(by_source["train"])
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits
        with adapter.disable_adapter():
            effect = (expected - adapter(input_ids=ids).logits).abs().max().item()
        assert effect > 0 and (load(out / "merged")(input_ids=ids).logits - expected).abs().max() < effect / 20


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_refuses_an_adapter_on_the_tied_matrix(target, work, exported):
    """Merging an adapter of the head (or of the embedding) into a tied matrix changes both: PEFT's merged model then
    computes other logits than its adapter model (checked with PEFT 0.21, with and without ensure_weight_tying)."""
    chats = work / "chats_refused.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in conversations(4)))
    result = warm_start.run([ROOT / "launch/lora.py", "--model", exported["fp32"], "--data", chats, "--out",
                             work / f"lora_{target}", "--target-modules", "q_proj", target, "--device", "cpu"],
                            env=subprocess_env(), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert target in errors[0] and "tie_word_embeddings" in errors[0], errors[0]
    assert not (work / f"lora_{target}" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def kd_run(work, by_source, pruned, source) -> Path:
    """The pruned model distilled from the unpruned one on 2 ranks, in fp32, with dynamic batch loading whose
    reference losses are the teacher's; a checkpoint after each update."""
    run_dir = work / "kd"
    run_ok(warm(2, overrides(run_dir, by_source["train"], pruned, f"distill.teacher={source}", *DISTILL,
                             f"data.validation_path={by_source['validation']}",
                             f"data.dynamic.every_steps={KD_EVERY}", "data.dynamic.reference=model",
                             "data.dynamic.eval_sequences=4", f"train.max_steps={KD_STEPS}",
                             f"checkpoint.every_steps={KD_EVERY}", "train.precision=fp32"), work / "kd.out"))
    return run_dir


def test_distillation_reads_the_tied_matrix_as_both_models_lm_head(kd_run, by_source, pruned, source):
    """The first step's losses, computed here from stock transformers' logits of the untrained student and of the
    teacher (each tied: its head is its embedding), are the logged ones."""
    first = read_log(kd_run)[0]
    student, teacher = load(pruned), load(source)
    assert is_tied(student) and is_tied(teacher)
    ids = windows(by_source["train"], first["sample_ids"])
    with torch.no_grad():
        s, t = student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1]
    kd = (F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none")
          .sum(-1).mean() * 4)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    assert first["kd_loss"] == pytest.approx(kd.item(), rel=1e-5)
    assert first["ce_loss"] == pytest.approx(ce.item(), rel=1e-5)


def domain_losses(model, validation: Path, sources) -> dict[str, float]:
    """transformers' own mean loss over 4 validation sequences of each domain, spread over its own."""
    shards = PackedShards(validation)
    index = SourceIndex.from_manifest(shards.manifest)
    losses = {}
    for name in sources:
        spread = np.arange(4) * index.size(name) // 4
        ids = torch.from_numpy(np.stack([shards[int(i)] for i in index.to_global(name, spread)]).astype(np.int64))
        with torch.no_grad():
            losses[name] = float(np.mean([model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]))
    return losses


def test_dynamic_loading_measures_the_tied_models(work, kd_run, by_source, source):
    """The reference losses are the tied teacher's; the losses of each update are those of the tied student as
    checkpointed at that step (exported here as its fp32 weights)."""
    reference = json.loads((kd_run / REFERENCE_FILE).read_text())["losses"]
    assert len(reference) > 1
    assert reference == pytest.approx(domain_losses(load(source), by_source["validation"], reference), rel=1e-5)
    log = read_log(kd_run)
    assert [r["step"] for r in log if "dynamic_losses" in r] == [KD_EVERY, KD_STEPS]
    checkpoint = ckpt.checkpoints_root(kd_run) / ckpt.tag_for(KD_EVERY)
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(work / "kd_hf")]) == 0
    student = load(work / "kd_hf")
    assert is_tied(student)
    measured = log[KD_EVERY - 1]["dynamic_losses"]
    assert measured == pytest.approx(domain_losses(student, by_source["validation"], reference), rel=1e-5)
